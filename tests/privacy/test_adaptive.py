"""Adaptive clipping (Andrew et al. 2021, arXiv:1905.03871): the clip norm follows a
quantile of the update norms through a noised count, the update noise is rescaled so the
whole costs the configured z, and C_t reaches the clients in the round's config."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedsim.errors import ScenarioError
from fedsim.privacy.accounting import adaptive_noise
from fedsim.privacy.ledger import Ledger
from fedsim.privacy.mechanisms import CLIP_KEY, AdaptiveClip, DpClip, GaussianSum
from fedsim.results import read_metrics
from fedsim.runner import execute
from fedsim.scenario import load_scenario
from fedsim.transforms import UpdateContext


def _clip(sigma_b: float = 0.0, m: float = 4) -> AdaptiveClip:
    return AdaptiveClip(
        clip_norm=1.0,
        target_quantile=0.5,
        learning_rate=0.2,
        count_stddev=sigma_b,
        expected_cohort=m,
        seed=3,
    )


def test_the_geometric_step_by_hand():
    c = _clip()
    c.step(1, 0, 4)  # all 4 within C: b = 1, C shrinks
    assert c.clip_norm == pytest.approx(math.exp(-0.2 * 0.5), rel=1e-12)
    c.step(2, 3, 4)  # b = 1/4
    assert c.clip_norm == pytest.approx(math.exp(-0.1) * math.exp(0.2 * 0.25), rel=1e-12)
    # Poisson cohorts: the fixed denominator m, on the centred count
    c = _clip(m=4)
    assert c.unclipped_fraction(1, clipped=0, n=6) == pytest.approx((6 - 3) / 4 + 0.5)


def test_the_count_noise_has_std_sigma_b_over_m_from_the_seed():
    c = _clip(sigma_b=2.0, m=10)
    draws = np.array([c.unclipped_fraction(r, clipped=5, n=10) for r in range(1, 4001)])
    assert abs(draws.std() / (2.0 / 10) - 1) < 0.05
    assert abs(draws.mean() - 0.5) < 4 * 0.2 / math.sqrt(len(draws))
    assert c.unclipped_fraction(7, 5, 10) == c.unclipped_fraction(7, 5, 10)


def test_clipping_and_noise_read_the_rounds_clip_norm():
    update = {"a": np.array([3.0, 4.0], np.float32)}
    ctx = UpdateContext(0, 1, 0, 1.0, config={CLIP_KEY: 2.5})
    out = DpClip(clip_norm=100.0).apply(update, ctx)
    np.testing.assert_allclose(out["a"], [1.5, 2.0], rtol=1e-6)
    assert ctx.notes["dp_clipped"] == 1.0
    noise = GaussianSum(clip_norm=1.0, noise_multiplier=2.0, expected_cohort=4)
    assert noise.std(2.5) == pytest.approx(2.0 * 2.5 / 4)


BASE = [
    "run.rounds=4",
    "data.num_clients=8",
    "model.hidden=[16]",
    "strategy.clients_per_round=4",
    "privacy.dp.mode=central",
    "privacy.dp.clipping=adaptive",
    "privacy.delta=1e-3",
]


def test_the_ledger_rescales_the_update_noise_and_accounts_z():
    over = [*BASE, "privacy.dp.clip_norm=0.1", "privacy.dp.noise_multiplier=1"]
    scn = load_scenario(None, [*over, "privacy.dp.clipped_count_stddev=2"])
    ledger = Ledger.of(scn)
    assert ledger is not None and ledger.noise_multiplier == 1.0  # accounted: z
    assert ledger.clip is not None and ledger.clip.count_stddev == 2.0
    noise = scn.chains().aggregate[0]
    assert noise.noise_multiplier == pytest.approx(adaptive_noise(1.0, 2.0))
    # sigma_b defaults to m / 20 = 0.2, not above z / 2: refused, naming the key
    with pytest.raises(ScenarioError, match="privacy.dp.clipped_count_stddev"):
        load_scenario(None, over)


@pytest.fixture(scope="module")
def adaptive_runs(tmp_path_factory, _ray_session):
    base = tmp_path_factory.mktemp("adaptive")
    runs = {}
    for engine in ("fedsim", "flower"):
        over = [
            *BASE,
            "privacy.dp.clip_norm=0.01",
            "privacy.dp.noise_multiplier=0.5",
            "privacy.dp.clipped_count_stddev=1",
            f"simulation.engine={engine}",
        ]
        runs[engine] = execute(load_scenario(None, over), out=base / engine).out_dir
    over = [*BASE, "run.rounds=8", "privacy.dp.clip_norm=5", "privacy.dp.noise_multiplier=0"]
    runs["exact"] = execute(load_scenario(None, over), out=base / "exact").out_dir
    return runs


def test_both_engines_give_the_same_model_and_clip_norms(adaptive_runs):
    a, b = (
        json.loads((adaptive_runs[e] / "summary.json").read_text()) for e in ("fedsim", "flower")
    )
    assert a["model_sha256"] == b["model_sha256"]
    na = [r["dp_clip_norm"] for r in read_metrics(adaptive_runs["fedsim"])]
    assert na == [r["dp_clip_norm"] for r in read_metrics(adaptive_runs["flower"])]
    # C_0 = 0.01 clips every update: C grows towards the median update norm
    assert na[0] == 0.01 and na[-1] > na[0]
    assert a["dp_clipping"] == "adaptive" and a["dp_clip_norm_last"] == na[-1]


def test_without_noise_c_follows_the_recorded_counts_exactly(adaptive_runs):
    recs = read_metrics(adaptive_runs["exact"])
    for prev, nxt in zip(recs, recs[1:], strict=False):
        unclipped = 1 - prev["dp_clipped_fraction"]  # fixed-size cohorts: n = m
        expected = prev["dp_clip_norm"] * math.exp(-0.2 * (unclipped - 0.5))
        assert nxt["dp_clip_norm"] == pytest.approx(expected, rel=1e-12)
    # C_0 = 5 clips nothing: C falls until it clips about half the updates
    fractions = [r["dp_clipped_fraction"] for r in recs]
    assert fractions[0] == 0.0 and recs[1]["dp_clip_norm"] == pytest.approx(5 * math.exp(-0.1))
    assert recs[-1]["dp_clip_norm"] < 5
    assert max(fractions) >= 0.25
