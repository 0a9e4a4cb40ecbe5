"""Tests for local SGD / FedProx training and evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from clients.training import EvalResult, evaluate_model, pick_device, train_local
from fedsim.models import build_model


def _blobs(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two well-separated Gaussian blobs in 5-D, labels 0/1."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n).astype(np.int64)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    x[:, 0] += np.where(y == 1, 3.0, -3.0).astype(np.float32)
    return x, y


def _model(seed: int = 0) -> nn.Module:
    return build_model("mlp", input_shape=(5,), num_classes=2, seed=seed)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_training_reduces_loss_on_separable_data() -> None:
    x, y = _blobs()
    model = _model()
    before = evaluate_model(model, x, y)
    res = train_local(model, x, y, epochs=3, batch_size=20, lr=0.1, generator=_gen(0))
    after = evaluate_model(model, x, y)
    assert after.loss < 0.5 * before.loss
    assert after.accuracy > 0.95
    assert res.num_examples == 200
    assert res.steps == 3 * 10
    assert 0.0 < res.train_loss < before.loss


def test_last_partial_batch_is_used() -> None:
    x, y = _blobs(n=45)
    res = train_local(_model(), x, y, epochs=2, batch_size=20, lr=0.1, generator=_gen(0))
    assert res.steps == 2 * 3


def test_same_generator_seed_gives_identical_weights() -> None:
    x, y = _blobs()
    kw = {"epochs": 2, "batch_size": 16, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
    a, b, c = _model(), _model(), _model()
    ra = train_local(a, x, y, generator=_gen(7), **kw)
    rb = train_local(b, x, y, generator=_gen(7), **kw)
    train_local(c, x, y, generator=_gen(8), **kw)
    assert torch.equal(_flat(a), _flat(b))
    assert ra == rb
    assert not torch.equal(_flat(a), _flat(c))


def test_training_ignores_global_rng() -> None:
    x, y = _blobs()
    a, b = _model(), _model()
    torch.manual_seed(1)
    train_local(a, x, y, epochs=1, batch_size=16, lr=0.05, generator=_gen(7))
    torch.manual_seed(2)
    train_local(b, x, y, epochs=1, batch_size=16, lr=0.05, generator=_gen(7))
    assert torch.equal(_flat(a), _flat(b))


def test_large_mu_keeps_weights_near_start() -> None:
    x, y = _blobs()
    start = _flat(_model())
    dists = {}
    for mu in (0.0, 10.0):
        model = _model()
        train_local(model, x, y, epochs=5, batch_size=10, lr=0.05, mu=mu, generator=_gen(3))
        dists[mu] = torch.linalg.vector_norm(_flat(model) - start).item()
    assert dists[0.0] > 0
    assert dists[10.0] < 0.25 * dists[0.0]


def test_first_step_is_plain_sgd_whatever_mu() -> None:
    # At the first step w == w^t, so the proximal term and its gradient vanish.
    x, y = _blobs()
    a, b = _model(), _model()
    train_local(a, x, y, epochs=1, batch_size=32, lr=0.1, generator=_gen(0), max_steps=1)
    train_local(b, x, y, epochs=1, batch_size=32, lr=0.1, mu=5.0, generator=_gen(0), max_steps=1)
    assert torch.allclose(_flat(a), _flat(b))


def test_train_loss_is_mean_ce_without_proximal_term() -> None:
    # Two full-batch steps: the reported loss is mean(CE(w0), CE(w1)); w1 is the same with
    # or without mu (see above), but at step 2 the proximal term would be large if counted.
    x, y = _blobs(n=64)
    ce0 = evaluate_model(_model(), x, y).loss
    one_step = _model()
    train_local(one_step, x, y, epochs=1, batch_size=64, lr=0.5, generator=_gen(0))
    ce1 = evaluate_model(one_step, x, y).loss
    res = train_local(_model(), x, y, epochs=2, batch_size=64, lr=0.5, mu=100.0, generator=_gen(0))
    assert res.steps == 2
    assert res.train_loss == pytest.approx((ce0 + ce1) / 2, rel=1e-5)


@pytest.mark.parametrize(("max_steps", "expected"), [(0, 0), (3, 3), (13, 13), (1000, 20)])
def test_max_steps_respected(max_steps: int, expected: int) -> None:
    x, y = _blobs(n=100)
    model = _model()
    start = _flat(model)
    res = train_local(
        model, x, y, epochs=2, batch_size=10, lr=0.1, generator=_gen(0), max_steps=max_steps
    )
    assert res.steps == expected
    assert res.num_examples == 100
    assert torch.equal(_flat(model), start) == (expected == 0)
    if expected == 0:
        assert res.train_loss == 0.0


def test_max_steps_matches_prefix_of_full_run() -> None:
    # Stopping after k steps gives the same weights as any run whose first k steps agree.
    x, y = _blobs(n=100)
    a, b = _model(), _model()
    train_local(a, x, y, epochs=1, batch_size=10, lr=0.1, generator=_gen(4), max_steps=4)
    train_local(b, x, y, epochs=1, batch_size=10, lr=0.1, generator=_gen(4), max_steps=4)
    c = _model()
    train_local(c, x, y, epochs=1, batch_size=10, lr=0.1, generator=_gen(4), max_steps=5)
    assert torch.equal(_flat(a), _flat(b))
    assert not torch.equal(_flat(a), _flat(c))


def test_train_on_empty_shard() -> None:
    x = np.zeros((0, 5), dtype=np.float32)
    y = np.zeros((0,), dtype=np.int64)
    res = train_local(_model(), x, y, epochs=2, batch_size=10, lr=0.1, generator=_gen(0))
    assert (res.train_loss, res.num_examples, res.steps) == (0.0, 0, 0)


def test_train_rejects_bad_arguments() -> None:
    x, y = _blobs(n=10)
    with pytest.raises(ValueError, match="batch_size"):
        train_local(_model(), x, y, epochs=1, batch_size=0, lr=0.1, generator=_gen(0))
    with pytest.raises(ValueError, match="mu"):
        train_local(_model(), x, y, epochs=1, batch_size=2, lr=0.1, mu=-1, generator=_gen(0))
    with pytest.raises(ValueError, match="length"):
        train_local(_model(), x, y[:5], epochs=1, batch_size=2, lr=0.1, generator=_gen(0))


def _fixed_linear() -> nn.Module:
    # logits = [x, -x, 0] for a 1-D input x.
    lin = nn.Linear(1, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0], [-1.0], [0.0]]))
        lin.bias.zero_()
    return lin


def test_evaluate_hand_computed() -> None:
    x = np.array([[2.0], [-1.0], [0.0]], dtype=np.float32)
    y = np.array([0, 0, 2], dtype=np.int64)
    # Sample 1: logits [2, -2, 0], label 0 -> CE = log(e^2 + e^-2 + 1) - 2, predicted 0 (right).
    # Sample 2: logits [-1, 1, 0], label 0 -> CE = log(e^-1 + e + 1) + 1, predicted 1 (wrong).
    # Sample 3: logits [0, 0, 0], label 2 -> CE = log 3, argmax ties -> 0 (wrong).
    ce = [
        math.log(math.exp(2) + math.exp(-2) + 1) - 2,
        math.log(math.exp(-1) + math.e + 1) + 1,
        math.log(3),
    ]
    for batch_size in (1, 2, 256):
        res = evaluate_model(_fixed_linear(), x, y, batch_size=batch_size)
        assert res.num_examples == 3
        assert res.loss == pytest.approx(sum(ce) / 3, rel=1e-6)
        assert res.accuracy == pytest.approx(1 / 3)


def test_evaluate_restores_mode_and_does_not_change_weights() -> None:
    model = _model()
    model.train()
    start = _flat(model)
    x, y = _blobs(n=20)
    evaluate_model(model, x, y)
    assert model.training
    assert torch.equal(_flat(model), start)
    model.eval()
    evaluate_model(model, x, y)
    assert not model.training


def test_evaluate_empty_set() -> None:
    x = np.zeros((0, 1), dtype=np.float32)
    y = np.zeros((0,), dtype=np.int64)
    assert evaluate_model(_fixed_linear(), x, y) == EvalResult(0.0, 0.0, 0)


def test_pick_device() -> None:
    assert pick_device(0) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device(0.25).type == expected


def test_fast_array_record_is_byte_identical_to_flowers():
    import torch as _torch
    from flwr.app import ArrayRecord as _AR

    from clients.app import to_array_record

    state = {
        "w": _torch.randn(3, 5),
        "b": _torch.arange(4, dtype=_torch.int64),
        "s": _torch.tensor(2.5),
    }
    ours, ref = to_array_record(state), _AR(state)
    for k in state:
        assert ours[k].data == ref[k].data and ours[k].shape == ref[k].shape
        assert ours[k].dtype == ref[k].dtype and ours[k].stype == ref[k].stype
    assert _torch.equal(ours.to_torch_state_dict()["w"], state["w"])
