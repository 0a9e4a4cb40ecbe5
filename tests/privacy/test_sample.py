"""Record-level DP-SGD (Opacus) in the clients' local training: each example's gradient
is clipped before the noise; each client's epsilon counts the steps it ran."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from clients.dpsgd import dp_problems, train_dpsgd
from fedsim.privacy.accounting import Mechanism, epsilon, steps_per_epoch
from fedsim.results import read_metrics
from fedsim.runner import execute
from fedsim.scenario import load_scenario


def _linear() -> nn.Module:
    m = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        m.weight.zero_()
    return m


def test_each_examples_gradient_is_clipped_before_the_noise():
    # Two examples in one full batch (B = n: q = 1), one with a huge gradient: with
    # clipping per example its pull is C, not a million times the other's.
    x = np.array([[1e6, 0.0], [0.0, 1.0]], np.float32)
    y = np.array([1, 1])
    g = torch.Generator().manual_seed(0)
    model = _linear()
    res = train_dpsgd(
        model,
        x,
        y,
        epochs=1,
        batch_size=2,
        lr=1.0,
        clip_norm=0.1,
        noise_multiplier=0.0,
        generator=g,
        noise_generator=torch.Generator().manual_seed(1),
    )
    assert res.steps == 1
    w = model.weight.detach().numpy()
    # Each example's gradient of the cross-entropy at w = 0 is (p - onehot) x^T with
    # p = (1/2, 1/2): norm |x| / sqrt(2); clipped to C = 0.1, summed, divided by the
    # expected batch size 2, and stepped with lr 1.
    g1 = np.outer([0.5, -0.5], x[0]) * min(1.0, 0.1 / (1e6 / np.sqrt(2)))
    g2 = np.outer([0.5, -0.5], x[1]) * min(1.0, 0.1 / (1 / np.sqrt(2)))
    np.testing.assert_allclose(w, -(g1 + g2) / 2, rtol=1e-4, atol=1e-7)
    assert np.linalg.norm(w) <= 0.1 + 1e-6  # the mean of two clipped gradients
    # With noise on, every step adds N(0, (zC)^2) / expected batch to each coordinate.
    model = _linear()
    train_dpsgd(
        model,
        np.zeros((4, 2), np.float32),  # zero inputs: zero gradients, noise only
        np.zeros(4, dtype=np.int64),
        epochs=200,
        batch_size=4,
        lr=1.0,
        clip_norm=0.5,
        noise_multiplier=2.0,
        generator=g,
        noise_generator=torch.Generator().manual_seed(2),
    )
    # 200 steps of N(0, (zC/B)^2) per coordinate: a sum with std sqrt(200) zC/B
    std = np.sqrt(200) * 2.0 * 0.5 / 4
    w = model.weight.detach().numpy()
    assert np.all(np.abs(w) < 5 * std) and np.abs(w).max() > 0.2 * std


def _classic_dpsgd(model, x, y, *, steps, batch_size, lr, clip_norm, z, generator, noise):
    """Opacus's classic path (per-example gradients materialised by GradSampleModule,
    clipped by DPOptimizer), drawing the same batches and noise as train_dpsgd."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    n = len(x)
    q = 1.0 / steps_per_epoch(n, batch_size)
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr),
        noise_multiplier=z,
        max_grad_norm=clip_norm,
        expected_batch_size=round(n * q),
        generator=noise,
    )
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        idx = torch.nonzero(torch.rand(n, generator=generator) < q).squeeze(1)
        opt.zero_grad(set_to_none=True)
        if len(idx):
            torch.nn.functional.cross_entropy(gsm(xt[idx]), yt[idx]).backward()
        else:
            for p in model.parameters():
                p.grad_sample = torch.zeros((0, *p.shape))
        opt.step()
    gsm._close()


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
def test_ghost_clipping_gives_opacus_classic_per_example_result(kind):
    # train_dpsgd clips with ghost norms: in one backward pass for all-linear models
    # (mlp, and seq: a linear layer over a sequence), in Opacus's two passes otherwise
    # (cnn: per-example gradients for the conv); Opacus's classic path materialises every
    # example's gradient. Same batches, same noise: the same weights to float rounding.
    rng = np.random.default_rng(0)
    shape = {"cnn": (1, 8, 8), "seq": (4, 4)}.get(kind, (16,))
    x = rng.standard_normal((40, *shape)).astype(np.float32) * 3
    y = rng.integers(0, 3, 40).astype(np.int64)

    def model():
        torch.manual_seed(0)
        if kind == "cnn":
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
        if kind == "seq":  # a linear layer over each of 4 positions
            return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))

    kw = dict(batch_size=8, lr=0.5, clip_norm=0.3)
    ours, theirs = model(), model()
    res = train_dpsgd(
        ours,
        x,
        y,
        epochs=3,
        noise_multiplier=0.7,
        generator=torch.Generator().manual_seed(5),
        noise_generator=torch.Generator().manual_seed(6),
        **kw,
    )
    _classic_dpsgd(
        theirs,
        x,
        y,
        steps=res.steps,
        z=0.7,
        generator=torch.Generator().manual_seed(5),
        noise=torch.Generator().manual_seed(6),
        **kw,
    )

    def gap(a: nn.Module, b: nn.Module) -> float:
        return max(
            (p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True)
        )

    moved, diff = gap(ours, model()), gap(ours, theirs)
    assert moved > 0.1 and diff < 1e-5, (moved, diff)


def test_in_place_activations_and_tied_weights_are_clipped_right():
    # The one-pass clipping takes the gradient at each linear layer's output: an
    # in-place ReLU after it must not change what that output was (the same weights
    # as with an ordinary ReLU). Tied linear layers go to Opacus (which refuses them).
    from clients.dpsgd import _LinearClipping

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 16)).astype(np.float32) * 3
    y = rng.integers(0, 3, 40).astype(np.int64)

    def trained(inplace: bool) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(inplace=inplace), nn.Linear(32, 3))
        train_dpsgd(
            model,
            x,
            y,
            epochs=2,
            batch_size=8,
            lr=0.5,
            clip_norm=0.3,
            noise_multiplier=0.7,
            generator=torch.Generator().manual_seed(5),
            noise_generator=torch.Generator().manual_seed(6),
        )
        return model

    a, b = trained(False), trained(True)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    assert _LinearClipping.of(nn.Sequential(first, second)) is None
    assert _LinearClipping.of(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))) is not None


def test_a_layer_that_per_example_gradients_cannot_handle_is_named():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    problems = dp_problems(model)
    assert len(problems) == 1 and "layer '2' (BatchNorm1d)" in problems[0]
    assert dp_problems(nn.Sequential(nn.Linear(4, 2))) == []


SAMPLE = [
    "run.rounds=3",
    "data.num_clients=6",
    "data.partition.kind=dirichlet",
    "data.partition.variant=flower",  # shards of unequal sizes: each client its own q
    "model.hidden=[16]",
    "strategy.clients_per_round=3",
    "client.batch_size=8",
    "privacy.dp.mode=sample",
    "privacy.dp.clip_norm=1",
    "privacy.dp.noise_multiplier=1.1",
    "privacy.delta=1e-4",
]


EPOCHS = load_scenario(None, SAMPLE).client.epochs


@pytest.fixture(scope="module")
def sample_runs(tmp_path_factory, _ray_session):
    base = tmp_path_factory.mktemp("sample")
    return {
        e: execute(load_scenario(None, [*SAMPLE, f"simulation.engine={e}"]), out=base / e).out_dir
        for e in ("fedsim", "flower")
    }


def test_both_engines_give_the_same_model(sample_runs):
    a, b = (json.loads((sample_runs[e] / "summary.json").read_text()) for e in ("fedsim", "flower"))
    assert a["model_sha256"] == b["model_sha256"]
    assert a["dp_mode"] == "sample" and a["dp_sampling_assumption"] == "sample"


def test_each_clients_epsilon_counts_the_steps_of_the_rounds_it_took_part_in(sample_runs):
    run = sample_runs["fedsim"]
    parts = json.loads((run / "partitions.json").read_text())
    sizes = {int(c["client_id"]): int(c["train_size"]) for c in parts["clients"]}
    with (run / "participation.csv").open() as f:
        took_part: dict[int, int] = {}
        for r in csv.DictReader(f):
            if r["status"] not in ("offline", "online", "dropped"):
                c = int(r["client_id"])
                took_part[c] = took_part.get(c, 0) + 1
    with (run / "privacy_clients.csv").open() as f:
        rows = {int(r["client_id"]): r for r in csv.DictReader(f)}
    assert set(rows) == set(took_part)  # a client that never took part spends nothing
    for c, r in rows.items():
        spe = steps_per_epoch(sizes[c], 8)
        assert int(r["releases"]) == took_part[c] * spe * EPOCHS
        mech = Mechanism(1.1, "poisson", q=1 / spe)
        assert float(r["epsilon"]) == epsilon("rdp", mech, int(r["releases"]), 1e-4)
        # one more round would have cost more
        assert epsilon("rdp", mech, int(r["releases"]) + spe, 1e-4) > float(r["epsilon"])
    assert len({int(r["releases"]) for r in rows.values()}) > 1  # unequal shards or rounds
    s = json.loads((run / "summary.json").read_text())
    assert s["dp_epsilon"] == max(float(r["epsilon"]) for r in rows.values())
    per_round = [r["dp_epsilon"] for r in read_metrics(run)]
    assert per_round == sorted(per_round) and per_round[-1] == s["dp_epsilon"]
