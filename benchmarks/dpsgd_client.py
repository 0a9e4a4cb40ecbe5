"""One client's local training on the mlp workload, with and without DP-SGD:
``python -m benchmarks.dpsgd_client [--reps 300]``.

MLP 784-128-10, 50 examples, batch 10, one epoch (5 steps), one thread; the median of
``--reps`` calls of fedsim's ``train_local`` and ``train_dpsgd`` (clip 1, z = 1), and
of DP-SGD without noise (z = 0: the clipping's own cost).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

from clients.dpsgd import train_dpsgd
from clients.training import train_local


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=300)
    reps = p.parse_args().reps
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    rng = np.random.default_rng(0)
    x = rng.random((50, 784), dtype=np.float32)
    y = rng.integers(0, 10, 50).astype(np.int64)
    g, ng = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)

    def ms(f) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)

    sgd = ms(lambda: train_local(model, x, y, epochs=1, batch_size=10, lr=0.1, generator=g))
    kw = dict(epochs=1, batch_size=10, lr=0.1, clip_norm=1.0, generator=g, noise_generator=ng)
    dp = ms(lambda: train_dpsgd(model, x, y, noise_multiplier=1.0, **kw))
    clip = ms(lambda: train_dpsgd(model, x, y, noise_multiplier=0.0, **kw))
    print(
        f"sgd {sgd:.2f} ms  dp-sgd {dp:.2f} ms ({dp / sgd:.2f}x)  dp-sgd without noise {clip:.2f} ms"
    )


if __name__ == "__main__":
    main()
