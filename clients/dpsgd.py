"""Record-level DP-SGD in a client's local training, with Opacus (Abadi et al. 2016,
"Deep Learning with Differential Privacy", arXiv:1607.00133).

Each step draws a Poisson batch (every example of the shard independently with
probability q = 1 / ceil(n / B), as Opacus's ``DPDataLoader`` does, so an epoch is
ceil(n / B) steps of expected size n q ~= B), clips each example's gradient to L2 norm
C, adds N(0, (z C)^2) to their sum and divides by the expected batch size before the SGD
step. A step whose Poisson batch is empty still adds the noise (as Opacus does): the
step count, not the data, decides how often the mechanism runs.

The clipping is ghost clipping (Li et al. 2022, "Large Language Models Can Be Strong
Differentially Private Learners", arXiv:2110.05679): each example's gradient norm comes
from a layer's activations and output gradients without materialising the per-example
gradients (for a linear layer, ||a_i|| ||g_i||). Two forms:

- a model whose trainable layers are all ``nn.Linear`` (``logreg``, ``mlp``) takes one
  backward pass (``_LinearClipping``, the "book-keeping" form of Bu et al. 2023,
  arXiv:2210.00038): the clipped sum is a matrix product per layer of the kept
  activations and output gradients;
- any other model takes Opacus's ``GradSampleModuleFastGradientClipping``: a first
  backward pass for the norms (layers other than linear and embedding ones fall back to
  Opacus's per-example gradients) and a second of the loss reweighted by
  min(1, C / ||grad_i||) for the clipped sum.

Both give the clipped sum of Opacus's classic ``GradSampleModule`` (to float rounding:
3e-8 in the tests). The noise and the step are Opacus's ``DPOptimizerFastGradientClipping``
(less a deep copy of every gradient per step, same arithmetic and noise stream). On
the ``mlp`` workload here a client's DP-SGD training costs 3.4 ms against 1.0 ms
without DP and 1.95 ms with the noise off (``python -m benchmarks.dpsgd_client``); the
rest is drawing the noise (N(0, (zC)^2) for each of the model's 100k weights, every
step). Opacus's two passes took 6.2 ms.

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

# One Opacus wrapper per model object (a worker reuses its model for every client):
# wrapping again would hook every layer twice. Its hooks are on only while train_dpsgd
# runs, so the same model trained or evaluated otherwise pays nothing for them.
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


def _optimizer(**kwargs: Any) -> Any:
    """Opacus's ``DPOptimizerFastGradientClipping``, less two of its costs on a small
    model (a third of a client's DP-SGD time on ``mlp``), with the same arithmetic and
    the same noise stream: it deep-copies every gradient into ``summed_grad`` at each
    step (here ``summed_grad`` takes the gradient tensor itself: nothing else holds it),
    and allocates each parameter's noise afresh (here drawn into a buffer kept for the
    call, by the same ``normal_`` on the same generator)."""
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class Optimizer(DPOptimizerFastGradientClipping):  # type: ignore[misc]
        def accumulate(self) -> None:
            for p in self.params:
                if p.summed_grad is not None:
                    p.summed_grad.add_(p.grad)
                else:
                    p.summed_grad = p.grad.detach()

        def add_noise(self) -> None:
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                if std > 0:
                    noise = self.buffers.get(p)
                    if noise is None:
                        noise = self.buffers[p] = torch.empty_like(p.summed_grad)
                    p.summed_grad.add_(noise.normal_(0.0, std, generator=self.generator))
                p.grad = p.summed_grad.view_as(p)
                _mark_as_processed(p.summed_grad)

    opt = Optimizer(**kwargs)
    # (what the two overrides assume: no secure-mode noise, no gradient accumulation
    # over steps, so p.grad is this step's alone and summed_grad may take it)
    if opt.secure_mode or getattr(opt, "_adjusted_noise_multiplier", None) is not None:
        raise ValueError("DP-SGD: secure mode and adaptive clipping are not supported here")
    opt.buffers = {}
    return opt


def _ghost_module(model: nn.Module, clip_norm: float) -> Any:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    gsm = _WRAPPED.get(model)
    if gsm is None:
        gsm = GradSampleModuleFastGradientClipping(
            model,
            batch_first=True,
            loss_reduction="mean",
            max_grad_norm=clip_norm,
            use_ghost_clipping=True,
        )
        _WRAPPED[model] = gsm
    gsm.max_grad_norm = clip_norm
    return gsm


def _clip_coef(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """min(1, C / ||grad_i||), as Opacus computes it."""
    return (clip_norm / (norms + 1e-6)).clamp(max=1.0)


class _GhostClipping:
    """Opacus's ghost clipping: a backward pass for the norms (hooks on), a second one
    of the reweighted loss for the clipped sum (hooks off). Any layer Opacus knows."""

    def __init__(self, model: nn.Module, clip_norm: float) -> None:
        self.gsm = _ghost_module(model, clip_norm)

    def __enter__(self) -> _GhostClipping:
        self.gsm.enable_hooks()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gsm.disable_hooks()

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.gsm(x), y, reduction="none")

    def clipped_sum(self, losses: torch.Tensor, params: list[nn.Parameter]) -> None:
        losses.mean().backward(retain_graph=True)
        for p in params:
            p.grad = None
        coef = self.gsm.get_clipping_coef()
        self.gsm.disable_hooks()
        try:
            (coef.detach() * losses).sum().backward()
        finally:
            self.gsm.enable_hooks()


class _LinearClipping:
    """The same clipped sum in one backward pass, for a model whose trainable layers
    are all ``nn.Linear`` (``mlp``, ``logreg``): the "book-keeping" form of ghost
    clipping (Bu et al. 2023, arXiv:2210.00038). The forward keeps each layer's input
    a; one ``autograd.grad`` of the summed loss to the layers' outputs gives each
    example's output gradient b (no weight gradient is formed); example i's gradient of
    a layer is b_i a_i^T, so its squared norm is ||a_i||^2 ||b_i||^2 (+ ||b_i||^2 for the
    bias), and the clipped sum is (c * b)^T a with c = min(1, C / ||grad_i||) over all
    layers. Opacus's second backward pass is a matrix product per layer here; the
    result equals Opacus's to float rounding (tests/privacy/test_sample.py). A layer
    applied to inputs with extra dimensions (a sequence) has its examples' gradients
    formed explicitly; a layer used twice in one forward is refused."""

    def __init__(self, model: nn.Module, layers: list[nn.Linear], clip_norm: float) -> None:
        self.model = model
        self.layers = layers
        self.clip_norm = clip_norm
        self.seen: list[tuple[nn.Linear, torch.Tensor, int, torch.Tensor]] = []
        self.handles: list[Any] = []

    @staticmethod
    def of(model: nn.Module) -> list[nn.Linear] | None:
        """The model's trainable layers if all are ``nn.Linear`` and share no parameter
        (tied weights: an example's gradient sums over the uses), else None."""
        layers, params = [], set()
        for m in model.modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if own:
                if type(m) is not nn.Linear or any(id(p) in params for p in own):
                    return None
                params.update(id(p) for p in own)
                layers.append(m)
        return layers

    def _keep(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor
    ) -> torch.Tensor:
        a = inputs[0].detach()
        self.seen.append((module, a, a._version, out))
        # The layers after it get a copy: an in-place op there (ReLU(inplace=True))
        # leaves this output, whose gradient is taken, as it was.
        return out.clone()

    def __enter__(self) -> _LinearClipping:
        self.handles = [m.register_forward_hook(self._keep) for m in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.seen.clear()

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen.clear()
        return F.cross_entropy(self.model(x), y, reduction="none")

    def clipped_sum(self, losses: torch.Tensor, params: list[nn.Parameter]) -> None:
        seen = self.seen
        if len({id(m) for m, _, _, _ in seen}) < len(seen):
            raise ValueError("DP-SGD: a linear layer used twice in one forward pass")
        if any(a._version != version for _, a, version, _ in seen):
            raise ValueError("DP-SGD: a linear layer's input was changed in place after it")
        outs = torch.autograd.grad(losses.sum(), [o for _, _, _, o in seen], allow_unused=True)
        n = len(losses)
        sq = torch.zeros(n, dtype=losses.dtype, device=losses.device)
        parts = []
        for (m, a, _, out), b in zip(seen, outs, strict=True):
            b = torch.zeros_like(out) if b is None else b.detach()  # (a layer the loss skips)
            if a.dim() == 2:
                bb = b.square().sum(1)
                if m.weight.requires_grad:
                    sq += a.square().sum(1) * bb
                per_example = None
            else:
                a3, b3 = a.reshape(n, -1, a.shape[-1]), b.reshape(n, -1, b.shape[-1])
                per_example = torch.einsum("nto,nti->noi", b3, a3)
                b = b3.sum(1)
                bb = b.square().sum(1)
                if m.weight.requires_grad:
                    sq += per_example.square().sum((1, 2))
            if m.bias is not None and m.bias.requires_grad:
                sq += bb
            parts.append((m, a, b, per_example))
        coef = _clip_coef(sq.sqrt(), self.clip_norm)
        for m, a, b, per_example in parts:
            cb = b * coef[:, None]
            if m.weight.requires_grad:
                if per_example is None:
                    m.weight.grad = cb.T @ a
                else:
                    m.weight.grad = torch.einsum("n,noi->oi", coef, per_example)
            if m.bias is not None and m.bias.requires_grad:
                m.bias.grad = cb.sum(0)


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
    device = torch.device(device)
    _to_device(model, device)
    model.train()
    xt, yt = _as_tensors(x, y, device)
    n = len(xt)
    params = [p for p in model.parameters() if p.requires_grad]
    q = sampling_rate(n, batch_size)
    opt = _optimizer(
        optimizer=torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay),
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip_norm,
        expected_batch_size=max(1, round(n * q)),
        loss_reduction="mean",
        generator=noise_generator,
    )
    total = epochs * steps_per_epoch(n, batch_size)
    if max_steps is not None:
        total = min(total, max_steps)
    seen = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    layers = _LinearClipping.of(model)
    clipping: _GhostClipping | _LinearClipping = (
        _GhostClipping(model, clip_norm)
        if layers is None
        else _LinearClipping(model, layers, clip_norm)
    )
    with clipping, warnings.catch_warnings():
        # Opacus's hooks on a first layer whose input needs no gradient: expected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(total):
            idx = torch.nonzero(torch.rand(n, generator=generator) < q).squeeze(1).to(device)
            opt.zero_grad(set_to_none=True)
            if len(idx):
                losses = clipping.losses(xt[idx], yt[idx])
                clipping.clipped_sum(losses, params)  # in p.grad
                seen += len(idx)
                loss_sum += losses.detach().sum().double()
            else:  # an empty Poisson batch: no gradient, but the noise all the same
                for p in params:
                    p.grad = torch.zeros_like(p)
            opt.step()
    opt.zero_grad(set_to_none=True)
    train_loss = loss_sum.item() / seen if seen else 0.0
    return TrainResult(train_loss=train_loss, num_examples=n, steps=total)
