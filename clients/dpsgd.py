"""Record-level DP-SGD in a client's local training, with Opacus (Abadi et al. 2016,
"Deep Learning with Differential Privacy", arXiv:1607.00133).

Each step draws a Poisson batch (every example of the shard independently with
probability q = 1 / ceil(n / B), as Opacus's ``DPDataLoader`` does, so an epoch is
ceil(n / B) steps of expected size n q ~= B), computes per-example gradients with
Opacus's ``GradSampleModule``, and lets Opacus's ``DPOptimizer`` clip each example's
gradient to L2 norm C, add N(0, (z C)^2) to their sum and divide by the expected batch
size before the SGD step. A step whose Poisson batch is empty still adds the noise (as
Opacus does): the step count, not the data, decides how often the mechanism runs.

Why Opacus: it is the field's library for per-example DP-SGD (PyTorch's own), it
validates layers (``ModuleValidator``: BatchNorm mixes examples, so a model with it is
refused naming the layer) and its optimizer is the reference implementation that the
accountant's event describes. ``torch.func`` would compute the same per-example
gradients; Opacus adds the vetted clipping, noise and validation.

Randomness comes from two seeded generators: the batches' from ``generator``, the
noise's from ``noise_generator``; same inputs give bit-identical weights on the CPU.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clients.training import TrainResult, _as_tensors, _to_device
from fedsim.privacy.accounting import steps_per_epoch

__all__ = ["dp_problems", "sampling_rate", "train_dpsgd"]

# One GradSampleModule per model object (a worker reuses its model for every client):
# wrapping again would hook every layer twice.
_WRAPPED: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def sampling_rate(n: int, batch_size: int) -> float:
    """Each example's chance of being in a step's batch: 1 / ceil(n / B)."""
    return 1.0 / steps_per_epoch(n, batch_size) if n else 0.0


def dp_problems(model: nn.Module) -> list[str]:
    """What stops DP-SGD on ``model``: one line per offending layer, naming it (empty
    when Opacus can train it). Opacus's own validators (BatchNorm mixes the examples of
    a batch; nn.LSTM needs DPLSTM; ...) and its rule that a trainable layer may keep no
    buffers (they would leak unnoised statistics of the examples)."""
    from opacus.validators import ModuleValidator

    problems = []
    for name, m in model.named_modules():
        label = f"layer '{name or type(m).__name__}' ({type(m).__name__})"
        trainable = any(p.requires_grad for p in m.parameters(recurse=False))
        check = ModuleValidator.VALIDATORS.get(type(m))
        errors = check(m) if check is not None and trainable else []
        if errors:
            first = str(errors[0]).split(". ")[0].rstrip(".")
            problems.append(f"{label}: {first}")
        elif trainable and any(True for _ in m.buffers(recurse=False)):
            problems.append(f"{label}: a trainable layer with buffers, which Opacus refuses")
    return problems


def _grad_sample_module(model: nn.Module) -> Any:
    from opacus import GradSampleModule

    gsm = _WRAPPED.get(model)
    if gsm is None:
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        _WRAPPED[model] = gsm
    return gsm


def train_dpsgd(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
    noise_generator: torch.Generator,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
    max_steps: int | None = None,
) -> TrainResult:
    """Train ``model`` in place with DP-SGD; ``steps`` in the result is how many times
    the Gaussian mechanism ran (what the accountant counts)."""
    from opacus.optimizers import DPOptimizer

    device = torch.device(device)
    _to_device(model, device)
    model.train()
    xt, yt = _as_tensors(x, y, device)
    n = len(xt)
    gsm = _grad_sample_module(model)
    params = [p for p in model.parameters() if p.requires_grad]
    q = sampling_rate(n, batch_size)
    opt = DPOptimizer(
        torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay),
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip_norm,
        expected_batch_size=max(1, round(n * q)),
        generator=noise_generator,
    )
    total = epochs * steps_per_epoch(n, batch_size)
    if max_steps is not None:
        total = min(total, max_steps)
    seen = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(total):
        idx = torch.nonzero(torch.rand(n, generator=generator) < q).squeeze(1).to(device)
        opt.zero_grad(set_to_none=True)
        if len(idx):
            ce = F.cross_entropy(gsm(xt[idx]), yt[idx])
            with warnings.catch_warnings():
                # Opacus's hooks on a first layer whose input needs no gradient: expected.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                ce.backward()
            seen += len(idx)
            loss_sum += ce.detach().double() * len(idx)
        else:  # an empty Poisson batch: no gradient, but the noise all the same
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        opt.step()
    opt.zero_grad(set_to_none=True)
    train_loss = loss_sum.item() / seen if seen else 0.0
    return TrainResult(train_loss=train_loss, num_examples=n, steps=total)
