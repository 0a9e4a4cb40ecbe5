"""Central DP-FedAvg: clipping, equal weights, the fixed denominator, the noise, the
accountant's epsilon in the run's files, calibration and the budget, on both engines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedsim.engine.fold import fold_weighted_mean
from fedsim.engine.screening import finish_mean, screen
from fedsim.engine.validation import ReplyLimits
from fedsim.privacy.accounting import Mechanism, epsilon
from fedsim.privacy.mechanisms import CLIPPED, DpClip, GaussianSum
from fedsim.results import read_metrics
from fedsim.runner import execute
from fedsim.scenario import load_scenario
from fedsim.transforms import Chains, UpdateContext


def _instruction(w: np.ndarray) -> Message:
    content = RecordDict(
        {"arrays": ArrayRecord({"w": Array(w)}), "config": ConfigRecord({"server-round": 1})}
    )
    msg = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "m"
    return msg


def _reply(msg: Message, w: np.ndarray, n: int) -> Message:
    content = RecordDict(
        {"arrays": ArrayRecord({"w": Array(w)}), "metrics": MetricRecord({"num-examples": n})}
    )
    return Message(content, reply_to=msg)


def _central(clip: float, z: float, m: int) -> Chains:
    return Chains(
        update=(DpClip(clip_norm=clip),),
        aggregate=(GaussianSum(clip_norm=clip, noise_multiplier=z, expected_cohort=m),),
        seed=0,
        equal_weights=True,
    )


def _aggregate(
    chains: Chains, w_t: np.ndarray, replies: list[tuple[np.ndarray, int]]
) -> np.ndarray:
    """The coordinator's path: screen each reply, fold, finish with the aggregate chain."""
    msg = _instruction(w_t)
    limits = ReplyLimits(max_examples=None)
    screened, updates = [], []
    for cid, (w, n) in enumerate(replies):
        r, u = screen(_reply(msg, w, n), msg, chains, cid, limits)
        screened.append(r)
        updates.append(u)
    out = fold_weighted_mean(
        screened,
        with_arrays=True,
        reply_to=msg,
        updates=updates,
        finish=finish_mean(chains, 1),
        weight_of=chains.weight,
    )
    assert out is not None
    return out.content["arrays"]["w"].numpy(), out.content["metrics"]


@pytest.mark.usefixtures("task_identity")
def test_two_clients_by_hand_clipped_equal_weights_fixed_denominator():
    w_t = np.array([1.0, 1.0], np.float32)
    big = w_t + np.array([3.0, 4.0], np.float32)  # update norm 5: clipped to 1
    small = w_t + np.array([0.3, 0.4], np.float32)  # norm 0.5: kept
    # 90 examples against 10: equal weights all the same (example weights would give
    # the small client 90% of the mean)
    w, metrics = _aggregate(_central(1.0, 0.0, 2), w_t, [(big, 10), (small, 90)])
    expected = w_t + (np.array([0.6, 0.8]) + np.array([0.3, 0.4])) / 2
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    assert metrics[CLIPPED] == pytest.approx(0.5)
    # Fixed denominator: one client of an expected cohort of 2 moves the model by its
    # clipped update over 2, not by all of it.
    w, _ = _aggregate(_central(1.0, 0.0, 2), w_t, [(big, 10)])
    np.testing.assert_allclose(w, w_t + np.array([0.3, 0.4]), rtol=1e-6)


def test_noise_std_is_z_c_over_m_within_5_percent_over_many_seeds():
    z, c, m = 1.3, 0.7, 20
    noise = GaussianSum(clip_norm=c, noise_multiplier=z, expected_cohort=m)
    draws = []
    for seed in range(40):
        ctx = UpdateContext(seed=seed, server_round=3, cid=-1, weight=m)
        out = noise.apply({"a": np.zeros(2000, np.float32)}, ctx)
        draws.append(out["a"].astype(np.float64))
    x = np.concatenate(draws)
    assert abs(x.std() / (z * c / m) - 1) < 0.05
    assert abs(x.mean()) < 4 * (z * c / m) / np.sqrt(x.size)
    # from the root seed: the same seed and round give the same noise, another round not
    again = noise.apply({"a": np.zeros(2000, np.float32)}, UpdateContext(39, 3, -1, m))
    other = noise.apply({"a": np.zeros(2000, np.float32)}, UpdateContext(39, 4, -1, m))
    np.testing.assert_array_equal(again["a"], draws[-1].astype(np.float32))
    assert not np.array_equal(other["a"], again["a"])


DP = [
    "run.rounds=3",
    "data.num_clients=8",
    "model.hidden=[16]",
    "strategy.clients_per_round=4",
    "coordinator.sampling=poisson",
    "privacy.dp.mode=central",
    "privacy.dp.clip_norm=0.5",
    "privacy.delta=1e-3",
]


def _summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory, _ray_session):
    base = tmp_path_factory.mktemp("dp")
    return {
        engine: execute(
            load_scenario(
                None, [*DP, "privacy.dp.noise_multiplier=1.1", f"simulation.engine={engine}"]
            ),
            out=base / engine,
        ).out_dir
        for engine in ("fedsim", "flower")
    }


def test_both_engines_give_the_same_noised_model(dp_runs):
    a, b = (_summary(dp_runs[e]) for e in ("fedsim", "flower"))
    assert a["model_sha256"] == b["model_sha256"]
    assert (
        read_metrics(dp_runs["fedsim"])[0]["dp_epsilon"]
        == read_metrics(dp_runs["flower"])[0]["dp_epsilon"]
    )


def test_epsilon_is_in_every_round_and_the_summary_says_what_it_assumed(dp_runs):
    recs = read_metrics(dp_runs["fedsim"])
    mech = Mechanism(1.1, "poisson", q=4 / 8)
    assert [r["dp_epsilon"] for r in recs] == [epsilon("rdp", mech, r, 1e-3) for r in (1, 2, 3)]
    assert all(0 <= r["dp_clipped_fraction"] <= 1 for r in recs)
    s = _summary(dp_runs["fedsim"])
    assert s["dp_epsilon"] == recs[-1]["dp_epsilon"]
    assert s["dp_delta"] == 1e-3 and s["dp_accountant"] == "rdp"
    assert s["dp_sampling_assumption"] == "poisson" and s["dp_sampling_rate"] == 0.5
    assert s["dp_noise_multiplier"] == 1.1 and s["dp_clip_norm"] == 0.5
    assert len(s["dp_clipped_fraction_per_round"]) == 3
    # Poisson cohorts vary in size and are aggregated whole
    selected = [r["clients_selected"] for r in recs]
    assert [r["clients_aggregated"] for r in recs] == selected


def test_noise_changes_the_model_and_no_noise_is_infinite_epsilon(tmp_path, ray_cluster, dp_runs):
    out = execute(
        load_scenario(None, [*DP, "privacy.dp.noise_multiplier=0"]), out=tmp_path / "z0"
    ).out_dir
    assert _summary(out)["model_sha256"] != _summary(dp_runs["fedsim"])["model_sha256"]
    # no noise, no guarantee: epsilon is infinite, which JSON writes as null
    assert _summary(out)["dp_epsilon"] is None
    assert all(r["dp_epsilon"] is None for r in read_metrics(out))


def test_churn_accounts_without_amplification_unless_assumed(tmp_path, ray_cluster):
    churn = [*DP, "privacy.dp.noise_multiplier=1.1", "churn.dropout.p=0.2"]
    s = _summary(execute(load_scenario(None, churn), out=tmp_path / "a").out_dir)
    assert s["dp_sampling_assumption"] == "none"
    assert s["dp_epsilon"] == epsilon("rdp", Mechanism(1.1, "none"), 3, 1e-3)
    assumed = [*churn, "privacy.assume_sampling=poisson"]
    s2 = _summary(execute(load_scenario(None, assumed), out=tmp_path / "b").out_dir)
    assert s2["dp_sampling_assumption"] == "poisson" and s2["dp_epsilon"] < s["dp_epsilon"]
    assert "despite churn" in s2["dp_sampling_assumption_text"]


def test_target_epsilon_calibrates_z_and_stop_at_budget_stops(tmp_path, ray_cluster):
    s = _summary(
        execute(
            load_scenario(None, [*DP, "privacy.target_epsilon=8.0"]), out=tmp_path / "t"
        ).out_dir
    )
    assert s["dp_noise_multiplier_calibrated"] and s["rounds_completed"] == 3
    assert 0.99 * 8.0 <= s["dp_epsilon"] <= 8.0
    # z = 1.5 spends more than 2.2 in 3 rounds: the run stops before the round that
    # would exceed it
    mech = Mechanism(1.5, "poisson", q=0.5)
    allowed = max(r for r in range(4) if epsilon("rdp", mech, r, 1e-3) <= 2.2)
    assert 0 < allowed < 3
    stop = [
        *DP,
        "privacy.dp.noise_multiplier=1.5",
        "privacy.target_epsilon=2.2",
        "privacy.stop_at_budget=true",
    ]
    s = _summary(execute(load_scenario(None, stop), out=tmp_path / "s").out_dir)
    assert s["rounds_completed"] == allowed and s["dp_stopped_at_budget"]
    assert s["dp_epsilon"] <= 2.2


C = ["privacy.dp.mode=central", "privacy.dp.clip_norm=1"]
OK = [*C, "privacy.dp.noise_multiplier=1", "privacy.delta=1e-3"]
BAD = [
    (["privacy.dp.mode=central", "privacy.dp.noise_multiplier=1"], "privacy.dp.clip_norm"),
    ([*OK, "privacy.delta=0.2"], "privacy.delta"),  # not below 1/num_clients
    ([*C, "privacy.dp.noise_multiplier=1"], "privacy.delta"),  # missing
    ([*OK, "privacy.target_epsilon=3"], "privacy.target_epsilon"),  # with a fixed z
    ([*C, "privacy.delta=1e-3"], "privacy.dp.noise_multiplier"),  # neither z nor target
    ([*OK, "strategy.name=krum"], "strategy.name"),  # no sensitivity bound
    ([*OK, "privacy.accountant=pld"], "privacy.accountant"),  # pld, fixed-size sampling
    (
        [*OK, "coordinator.sampling=poisson", "coordinator.over_commit=1.5"],
        "coordinator.over_commit",
    ),
    ([*OK, "privacy.dp.clip_norm=-1"], "privacy.dp.clip_norm"),
    ([*OK, "privacy.dp.sigma=1"], "privacy.dp.sigma"),  # unknown key
    ([*OK, "privacy.dp.noise_multiplier=inf"], "privacy.dp.noise_multiplier"),
    (["privacy.delta=1e-5"], "privacy.delta"),  # without a mechanism
    ([*OK, "privacy.dp.target_quantile=0.3"], "privacy.dp.target_quantile"),  # fixed clip
    ([*OK, "privacy.dp.clipping=sometimes"], "privacy.dp.clipping"),
    (
        [*OK, "privacy.dp.clipping=adaptive", "privacy.dp.clipped_count_stddev=0.4"],
        "privacy.dp.clipped_count_stddev",  # not above z / 2
    ),
    (  # the same, found only once z is calibrated (z > 0.6 here)
        [
            *C,
            "privacy.delta=1e-3",
            "privacy.target_epsilon=1",
            "privacy.dp.clipping=adaptive",
            "privacy.dp.clipped_count_stddev=0.3",
        ],
        "privacy.dp.clipped_count_stddev",
    ),
    # record-level DP: delta below 1/(largest shard), known once the data is split
    (
        [
            "privacy.dp.mode=sample",
            "privacy.dp.clip_norm=1",
            "privacy.dp.noise_multiplier=1",
            "privacy.delta=0.04",
        ],
        "privacy.delta",
    ),
    (
        [
            "privacy.dp.mode=sample",
            "privacy.dp.clip_norm=1",
            "privacy.dp.noise_multiplier=1",
            "privacy.delta=1e-3",
            "client.mu=0.1",
        ],
        "client.mu",
    ),
    (
        [
            "privacy.dp.mode=local",
            "privacy.dp.clip_norm=1",
            "privacy.dp.noise_multiplier=1",
            "privacy.delta=1e-3",
            "privacy.target_epsilon=2",
            "privacy.stop_at_budget=true",
        ],
        "privacy.stop_at_budget",
    ),
]


@pytest.mark.parametrize(("overrides", "key"), BAD)
def test_bad_privacy_settings_exit_2_with_one_line_naming_the_key(tmp_path, overrides, key):
    args = [a for o in overrides for a in ("--set", o)]
    p = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "run", *args, "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and key in lines[0], lines
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.incomplete").exists()


def test_a_budget_set_on_the_command_line_replaces_the_files_noise(tmp_path):
    # A file that fixes z (scenarios/dp_mnist.toml does) serves as the arm that
    # calibrates it to --set privacy.target_epsilon, and the other way round; both in
    # the file, or both on the command line, are refused.
    from fedsim.errors import ScenarioError

    def toml(name: str, privacy: str, dp: str) -> Path:
        path = tmp_path / name
        path.write_text(
            f"[privacy]\ndelta = 1e-3\n{privacy}[privacy.dp]\nmode = 'central'\n"
            f"clip_norm = 1.0\n{dp}"
        )
        return path

    fixed = toml("fixed.toml", "", "noise_multiplier = 1.0\n")
    target = toml("target.toml", "target_epsilon = 4.0\n", "")
    both = toml("both.toml", "target_epsilon = 4.0\n", "noise_multiplier = 1.0\n")
    scn = load_scenario(fixed, ["privacy.target_epsilon=8"])
    assert scn.privacy.target_epsilon == 8 and scn.privacy.dp.noise_multiplier is None
    scn = load_scenario(target, ["privacy.dp.noise_multiplier=2"])
    assert scn.privacy.target_epsilon is None and scn.privacy.dp.noise_multiplier == 2
    kept = load_scenario(fixed, ["privacy.target_epsilon=8", "privacy.stop_at_budget=true"])
    assert kept.privacy.dp.noise_multiplier == 1.0 and kept.privacy.stop_at_budget
    refused = [(both, []), (fixed, ["privacy.target_epsilon=8", "privacy.dp.noise_multiplier=2"])]
    for path, sets in refused:
        with pytest.raises(ScenarioError, match="privacy.target_epsilon"):
            load_scenario(path, sets)
