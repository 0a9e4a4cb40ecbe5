"""Local training and evaluation of a client's model on its shard (pure torch, no Flower).

Local training is minibatch SGD on cross-entropy, as in FedAvg's ClientUpdate (McMahan et
al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017, arXiv:1602.05629): ``epochs`` passes over the shard in a fresh random order
each, batches of ``batch_size`` with the last partial batch kept.

With ``mu > 0`` it solves FedProx's local subproblem (Li et al., "Federated Optimization
in Heterogeneous Networks", MLSys 2020, arXiv:1812.06127):
``min_w F_k(w) + (mu / 2) * ||w - w^t||^2``, where ``w^t`` is the model received at the
start of the call. ``max_steps`` cuts the work short, which is how FedProx models
stragglers doing a variable amount of local work.

Randomness comes only from the ``generator`` argument (batch order); same weights, data
and generator seed give bit-identical weights on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EvalResult", "TrainResult", "evaluate_model", "pick_device", "train_local"]


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What one call of :func:`train_local` did.

    ``train_loss`` is the mean cross-entropy over every sample seen while training (each
    measured before the step on its batch), without the proximal term.
    """

    train_loss: float
    num_examples: int
    steps: int


@dataclass(frozen=True, slots=True)
class EvalResult:
    """Mean cross-entropy and accuracy of a model on ``num_examples`` samples."""

    loss: float
    accuracy: float
    num_examples: int


def pick_device(gpus: float) -> torch.device:
    """CUDA when the client was given a (fraction of a) GPU and one is visible, else CPU."""
    if gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _as_tensors(
    x: np.ndarray, y: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    # as_tensor shares memory where it can and copies read-only arrays (the shared,
    # frozen dataset arrays) instead of warning about them.
    xt = _tensor(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    yt = _tensor(np.ascontiguousarray(y, dtype=np.int64)).to(device)
    return xt, yt


def _to_device(model: nn.Module, device: torch.device) -> None:
    # Module.to walks every submodule even when nothing moves: skip it when in place.
    p = next(model.parameters(), None)
    if p is None or p.device != device:
        model.to(device)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a) if a.flags.writeable else torch.tensor(a)


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    mu: float = 0.0,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    max_steps: int | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``(x, y)`` with SGD; it is left on ``device``.

    ``x`` is float32 of shape ``(N, *input_shape)``, ``y`` int64 class labels ``(N,)``.
    ``generator`` is a CPU generator that draws each epoch's permutation. ``mu`` is
    FedProx's proximal coefficient (0 is FedAvg). ``max_steps`` stops after that many
    optimizer steps even mid-epoch.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if lr < 0 or momentum < 0 or weight_decay < 0 or mu < 0:
        raise ValueError(
            f"lr, momentum, weight_decay and mu must be >= 0, got "
            f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}, mu={mu}"
        )
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")

    device = torch.device(device)
    _to_device(model, device)
    model.train()
    xt, yt = _as_tensors(x, y, device)
    n = len(xt)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    # w^t of FedProx: the weights as received, fixed for the whole call.
    anchor = [p.detach().clone() for p in params] if mu > 0 else []

    limit = max_steps if max_steps is not None else -1
    steps = 0
    # Each batch's loss stays on the device until the end (no host sync per step), and
    # one kept tensor per step is all it costs (a running sum cost four tensor ops a
    # step: a fifth of a small client's training).
    losses: list[torch.Tensor] = []
    sizes: list[int] = []
    for _ in range(epochs if n else 0):
        if steps == limit:
            break
        perm = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            if steps == limit:
                break
            idx = perm[start : start + batch_size]
            logits = model(xt[idx])
            ce = F.cross_entropy(logits, yt[idx])
            loss = ce
            if mu > 0:
                prox = sum((p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True))
                loss = ce + (mu / 2) * prox
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            losses.append(ce.detach())
            sizes.append(len(idx))

    return TrainResult(train_loss=_mean_loss(losses, sizes), num_examples=n, steps=steps)


def _mean_loss(losses: list[torch.Tensor], sizes: list[int]) -> float:
    """The example-weighted mean of the batches' losses, summed in float64 in order."""
    if not losses:
        return 0.0
    total = 0.0
    for loss, size in zip(torch.stack(losses).tolist(), sizes, strict=True):
        total += loss * size
    return total / sum(sizes)


def evaluate_model(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``; an empty set gives zeros.

    The model is moved to ``device`` and its train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    xt, yt = _as_tensors(x, y, device)
    n = len(xt)
    if n == 0:
        return EvalResult(loss=0.0, accuracy=0.0, num_examples=0)

    was_training = model.training
    _to_device(model, device)
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                xb, yb = xt[start : start + batch_size], yt[start : start + batch_size]
                logits = model(xb)
                loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
                correct += (logits.argmax(dim=1) == yb).sum()
    finally:
        model.train(was_training)
    return EvalResult(loss=loss_sum.item() / n, accuracy=correct.item() / n, num_examples=n)
