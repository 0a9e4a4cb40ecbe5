"""One measurement in its own process: ``python -m benchmarks.contender WORKLOAD CONTENDER``.

Prints one JSON line: per-round wall seconds and start-up timings. The parent process
(``benchmarks.run``) samples this process tree's memory meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def run_pure(workload: str, rounds: int, shard: tuple[int, int] = (0, 1)) -> dict:
    """The physical reference: the same work in one process, one core, no framework.

    Same cohorts (the coordinator's sampler), same generated data, model, initial
    weights, local training, evaluation on each trained client's held-out data, and an
    example-weighted average of the trained weights, exactly as FedAvg computes it.
    ``shard = (i, n)`` does only the i-th of n contiguous parts of each cohort (for
    ``pure2``: the same work split over parallel processes).

    What is timed is a plain torch loop written here, sharing no code with fedsim's
    training path (``clients.training``), so that path's costs cannot hide in the
    ideal: minibatch SGD in a fresh order per epoch (``torch.randperm`` on the
    client's batch generator, as fedsim draws it) and a no-grad evaluation. fedsim is
    used only before the clock starts (data, model, initial weights) and for the
    cohort's client ids.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from benchmarks.workloads import WORKLOADS
    from fedsim.data import load_federation
    from fedsim.engine.coordinator import sample_clients
    from fedsim.models import build_model
    from fedsim.rng import torch_generator

    torch.set_num_threads(1)
    scn = WORKLOADS[workload].scenario(rounds)
    seed, c = scn.run.seed, scn.client
    fed = load_federation(scn.data, seed=seed)
    model = build_model(
        scn.model, input_shape=fed.input_shape, num_classes=fed.num_classes, seed=seed
    )
    global_np = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # (shares the arrays, copied only if read-only or of another type)
        x, y = np.require(x, np.float32, ["C", "W"]), np.require(y, np.int64, ["C", "W"])
        return torch.from_numpy(x), torch.from_numpy(y)

    def train(xt: torch.Tensor, yt: torch.Tensor, g: torch.Generator) -> None:
        model.train()
        opt = torch.optim.SGD(
            model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay
        )
        n = len(xt)
        for _ in range(c.epochs):
            perm = torch.randperm(n, generator=g)
            for start in range(0, n, c.batch_size):
                idx = perm[start : start + c.batch_size]
                loss = F.cross_entropy(model(xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    def evaluate(xt: torch.Tensor, yt: torch.Tensor) -> tuple[float, float]:
        model.eval()
        loss, correct = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(xt), c.eval_batch_size):
                xb, yb = (
                    xt[start : start + c.eval_batch_size],
                    yt[start : start + c.eval_batch_size],
                )
                logits = model(xb)
                loss += F.cross_entropy(logits, yb, reduction="sum").item()
                correct += int((logits.argmax(dim=1) == yb).sum())
        return loss, correct

    if c.mu:
        raise ValueError(f"{workload}: the pure loop has no FedProx term (client.mu = {c.mu})")
    round_s = []
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        cids = sample_clients(seed, rnd, "train", scn.train_cohort, scn.num_clients)
        i, n = shard
        cids = cids[len(cids) * i // n : len(cids) * (i + 1) // n]
        start = {k: torch.from_numpy(v) for k, v in global_np.items()}
        acc = {k: np.zeros_like(v) for k, v in global_np.items()}
        total = 0
        for cid in cids:
            model.load_state_dict(start)
            xt, yt = tensors(*fed.train_data(cid))
            train(xt, yt, torch_generator(seed, "batch", rnd, cid))
            evaluate(*tensors(*fed.test_data(cid)))
            for k, v in model.state_dict().items():
                acc[k] += v.numpy() * np.float32(len(xt))
            total += len(xt)
        global_np = {k: v / np.float32(total) for k, v in acc.items()}
        round_s.append(time.perf_counter() - t0)
    return {"round_s": round_s, "ray_start_s": 0.0, "workers": 1}


def run_parallel_pure(workload: str, rounds: int, n: int = 2) -> dict:
    """``n`` pure loops at once, each on its part of every cohort: the compute floor of
    the machine's ``n`` cores (memory bandwidth and caches are shared). No exchange
    between them; round r's time is the slowest part's."""
    import subprocess

    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.contender",
                workload,
                "pure",
                f"--rounds={rounds}",
                f"--shard={i}/{n}",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    parts = []
    for p in procs:
        out, _ = p.communicate()
        line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
        parts.append(json.loads(line.removeprefix("RESULT "))["round_s"])
    return {"round_s": [max(r) for r in zip(*parts, strict=True)], "ray_start_s": 0.0, "workers": n}


def run_engine(workload: str, engine: str, rounds: int) -> dict:
    from benchmarks.workloads import WORKLOADS
    from fedsim.results import read_metrics
    from fedsim.runner import execute

    scn = WORKLOADS[workload].scenario(rounds, engine)
    with tempfile.TemporaryDirectory() as tmp:
        out = execute(scn, out=Path(tmp) / "run")
        records = read_metrics(out.out_dir)
    s = out.summary
    return {
        "round_s": [r["round_wall_s"] for r in records],
        "ray_start_s": s.get("ray_start_s", 0.0),
        "workers": s.get("workers", 0),
        "workers_start_s": s.get("workers_start_s", 0.0),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("workload")
    p.add_argument("contender", choices=["pure", "pure2", "fedsim", "flower"])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--shard", default="0/1", help="pure only: do part i of n of each cohort")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    if a.contender == "pure":
        i, n = (int(v) for v in a.shard.split("/"))
        res = run_pure(a.workload, a.rounds, (i, n))
    elif a.contender == "pure2":
        res = run_parallel_pure(a.workload, a.rounds)
    else:
        res = run_engine(a.workload, a.contender, a.rounds)
    res["process_s"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
