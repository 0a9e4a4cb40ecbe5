"""Local DP: each client clips and noises its own update before sending; each client's
epsilon counts the rounds it took part in, and nothing else."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from fedsim.errors import ScenarioError
from fedsim.privacy.accounting import Mechanism, epsilon
from fedsim.privacy.mechanisms import local_dp
from fedsim.results import read_metrics
from fedsim.runner import execute
from fedsim.scenario import load_scenario


def test_the_client_clips_then_adds_z_c_noise():
    w_t = {"w": np.ones(3, np.float32), "n": np.array([5], np.int64)}
    w = {"w": w_t["w"] + np.array([3.0, 4.0, 0.0], np.float32), "n": np.array([7], np.int64)}
    rng = np.random.default_rng(0)
    out, clipped = local_dp(w, w_t, clip_norm=1.0, noise_multiplier=0.0, rng=rng)
    assert clipped
    np.testing.assert_allclose(out["w"], [1.6, 1.8, 1.0], rtol=1e-6)
    assert out["n"][0] == 7 and out["w"].dtype == np.float32  # integer buffers as trained
    z, c = 1.5, 0.4
    big = {"w": np.zeros(50_000, np.float32)}
    out, clipped = local_dp(big, big, clip_norm=c, noise_multiplier=z, rng=rng)
    assert not clipped
    assert abs(out["w"].std() / (z * c) - 1) < 0.02


LOCAL = [
    "run.rounds=4",
    "data.num_clients=8",
    "model.hidden=[16]",
    "strategy.clients_per_round=3",
    "privacy.dp.mode=local",
    "privacy.dp.clip_norm=0.5",
    "privacy.dp.noise_multiplier=1",
    "privacy.delta=1e-3",
]


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory, _ray_session):
    base = tmp_path_factory.mktemp("local")
    return {
        e: execute(load_scenario(None, [*LOCAL, f"simulation.engine={e}"]), out=base / e).out_dir
        for e in ("fedsim", "flower")
    }


def _summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_both_engines_give_the_same_model(local_runs):
    a, b = (_summary(local_runs[e]) for e in ("fedsim", "flower"))
    assert a["model_sha256"] == b["model_sha256"]
    assert a["dp_mode"] == "local" and a["dp_accounting"] == "per client"


def test_each_clients_epsilon_counts_the_rounds_it_took_part_in(local_runs):
    run = local_runs["fedsim"]
    with (run / "participation.csv").open() as f:
        rows = list(csv.DictReader(f))
    took_part: dict[int, int] = {}
    for r in rows:
        if r["status"] not in ("offline", "online", "dropped"):
            took_part[int(r["client_id"])] = took_part.get(int(r["client_id"]), 0) + 1
    with (run / "privacy_clients.csv").open() as f:
        per_client = {int(r["client_id"]): r for r in csv.DictReader(f)}
    assert {c: int(r["releases"]) for c, r in per_client.items()} == took_part
    mech = Mechanism(0.5, "none")  # noise z C on a sensitivity of 2C
    for c, r in per_client.items():
        assert float(r["epsilon"]) == epsilon("rdp", mech, took_part[c], 1e-3)
    # more rounds, more epsilon; a client that sat a round out spends nothing in it
    counts = sorted(set(took_part.values()))
    assert len(counts) > 1
    eps = [epsilon("rdp", mech, n, 1e-3) for n in counts]
    assert eps == sorted(eps) and len(set(eps)) == len(eps)
    s = _summary(run)
    assert s["dp_epsilon"] == max(float(r["epsilon"]) for r in per_client.values())
    assert s["dp_epsilon_per_client"]["max"] == s["dp_epsilon"]
    assert s["dp_clients_accounted"] == len(took_part)
    assert s["dp_epsilon"] < epsilon("rdp", mech, 4, 1e-3) or max(counts) == 4
    per_round = [r["dp_epsilon"] for r in read_metrics(run)]
    assert per_round == sorted(per_round) and per_round[-1] == s["dp_epsilon"]


def test_any_strategy_may_aggregate_local_dp_updates():
    # the server sees noised updates only: a median is post-processing
    load_scenario(None, [*LOCAL, "strategy.name=fedmedian"])


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (["privacy.target_epsilon=3", "privacy.stop_at_budget=true"], "privacy.stop_at_budget"),
        (["privacy.assume_sampling=poisson", "churn.dropout.p=0.2"], "privacy.assume_sampling"),
    ],
)
def test_what_local_dp_cannot_do_is_refused(extra, key):
    with pytest.raises(ScenarioError) as exc:
        load_scenario(None, [*LOCAL, *extra])
    assert [line.split(":")[0] for line in exc.value.lines()] == [key]
