"""Churn, device heterogeneity and coordinator policies on the virtual clock."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg

from fedsim.engine.coordinator import Coordinator, NotEnoughClients
from fedsim.engine.grid import RayGrid
from fedsim.engine.policy import AGGREGATED, DROPPED, LATE, REPLIED, plan_round
from fedsim.errors import ScenarioError
from fedsim.results import read_metrics, without_timing
from fedsim.runner import build_world
from fedsim.scenario import load_scenario
from fedsim.world.participation import STATUSES, read_participation
from fedsim.world.system import Timing

from .test_coordinator import LocalPool


def _timing(total: list[float]) -> Timing:
    t = np.asarray(total, dtype=float)
    return Timing(download=np.zeros_like(t), compute=t, upload=np.zeros_like(t))


def _plan(total, *, k, deadline=None, partial=False, dropped=(), min_replies=1, steps=10):
    cids = np.arange(len(total))
    drop = np.isin(cids, list(dropped))
    return plan_round(
        cids,
        _timing(total),
        np.full(len(total), steps, dtype=float),
        drop,
        k=k,
        deadline_s=deadline,
        partial=partial,
        min_replies=min_replies,
        min_round_s=0.0,
    )


def test_deadline_below_the_slowest_makes_them_late_and_ends_the_round_at_it():
    plan = _plan([5.0, 30.0, 8.0, 50.0], k=4, deadline=20.0)
    assert plan.status == {0: AGGREGATED, 1: LATE, 2: AGGREGATED, 3: LATE}
    assert plan.duration_s == 20.0  # min(deadline, K-th arrival) = min(20, 50)
    assert plan.to_run == [0, 2]  # late work is never run, never aggregated


def test_round_closes_at_the_kth_arrival_before_the_deadline():
    plan = _plan([5.0, 3.0, 8.0, 9.0], k=2, deadline=20.0)
    assert plan.duration_s == 5.0
    assert sorted(c for c, s in plan.status.items() if s == AGGREGATED) == [0, 1]
    assert plan.status[2] == LATE and plan.status[3] == LATE  # over-committed, too slow


def test_partial_work_returns_the_steps_done_by_the_deadline():
    plan = _plan([5.0, 40.0, 200.0], k=3, deadline=20.0, partial=True, steps=10)
    # client 1: 4 s per step -> 5 steps by t=20; client 2: 20 s per step -> 1 step
    assert plan.max_steps == {1: 5, 2: 1}
    assert all(s == AGGREGATED for s in plan.status.values())
    plan = _plan([5.0, 400.0], k=2, deadline=20.0, partial=True, steps=10)
    assert plan.status[1] == LATE and 1 not in plan.max_steps  # not even one step


def test_dropouts_fail_when_they_would_have_arrived_and_min_replies_skips():
    plan = _plan([5.0, 9.0, 7.0], k=3, dropped={1})
    assert plan.status == {0: AGGREGATED, 1: DROPPED, 2: AGGREGATED}
    assert plan.duration_s == 9.0 and plan.to_run == [0, 1, 2]
    plan = _plan([5.0, 9.0, 7.0], k=3, dropped={1, 2}, min_replies=2)
    assert plan.skipped and plan.status[0] == REPLIED


def _world(overrides, num_clients=20):
    scn = load_scenario(None, [f"data.num_clients={num_clients}", *overrides])
    return scn, build_world(scn, np.full(num_clients, 50))


def _coordinator(scn, world, rounds, cohort, log):
    return Coordinator(
        strategy=FedAvg(fraction_train=1.0, min_train_nodes=0, min_available_nodes=0),
        initial_arrays=ArrayRecord({"w": Array(np.zeros(1, np.float32))}),
        num_clients=scn.num_clients,
        rounds=rounds,
        train_cohort=cohort,
        eval_cohort=0,
        seed=scn.run.seed,
        world=world,
        policy=scn.coordinator,
        on_participation=lambda r, online, status: log.append((r, online, dict(status))),
    )


def test_selection_only_among_online_clients_and_the_clock_advances():
    scn, world = _world(
        ["churn.availability.kind=bernoulli", "churn.availability.p_online=0.3"], 200
    )
    log: list = []
    res = _coordinator(scn, world, 30, 20, log).run(RayGrid(LocalPool(), num_clients=200))
    fractions = []
    for _, online, status in log:
        assert all(online[c] for c in status)
        fractions.append(online.mean())
    assert abs(np.mean(fractions) - 0.3) < 0.03
    times = [r["virtual_time_s"] for r in res.rounds]
    assert all(b > a for a, b in zip(times, times[1:], strict=False))


def test_too_few_online_clients_ends_the_run_within_max_wait(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("client_id,online_start_s,online_end_s\n3,100000,200000\n")
    scn, world = _world(
        [
            "churn.availability.kind=trace",
            f"churn.availability.path='{trace}'",
            "coordinator.max_wait_s=3600",
            "coordinator.wait_step_s=60",
        ]
    )
    coord = _coordinator(scn, world, 3, 5, [])
    with pytest.raises(
        NotEnoughClients, match=r"only 0 client\(s\) online .* after waiting 3600 s"
    ):
        coord.run(RayGrid(LocalPool(), num_clients=20))
    assert coord.clock == 3600


def test_trace_exactly_the_clients_inside_their_intervals_are_selectable(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text(
        "client_id,online_start_s,online_end_s\n1,0,1e9\n4,0,1e9\n7,0,1e9\n9,5e8,1e9\n"
    )
    scn, world = _world(["churn.availability.kind=trace", f"churn.availability.path='{trace}'"])
    log: list = []
    _coordinator(scn, world, 3, 10, log).run(RayGrid(LocalPool(), num_clients=20))
    for _, online, status in log:
        assert sorted(status) == [1, 4, 7] == np.flatnonzero(online).tolist()


def test_churn_is_deterministic_for_a_seed():
    overrides = [
        "churn.availability.kind=markov",
        "churn.availability.mean_on_s=30",
        "churn.availability.mean_off_s=30",
        "churn.dropout.p=0.2",
        "system.speed={kind='lognormal', median=20.0, sigma=1.0}",
        "coordinator.over_commit=1.5",
        "coordinator.deadline_s=5",
    ]
    runs = []
    for _ in range(2):
        scn, world = _world(overrides, 50)
        log: list = []
        res = _coordinator(scn, world, 8, 6, log).run(RayGrid(LocalPool(), num_clients=50))
        runs.append((res.rounds, [(r, s) for r, _, s in log], res.arrays["w"].numpy().tobytes()))
    strip = [[{k: v for k, v in r.items() if k != "round_wall_s"} for r in x[0]] for x in runs]
    assert strip[0] == strip[1] and runs[0][1:] == runs[1][1:]
    statuses = {s for _, st in runs[0][1] for s in st.values()}
    assert {AGGREGATED, LATE} <= statuses


def test_flower_engine_rejects_what_its_runtime_cannot_express():
    with pytest.raises(ScenarioError) as err:
        load_scenario(
            None,
            [
                "simulation.engine=flower",
                "churn.availability.kind=markov",
                "coordinator.deadline_s=10",
            ],
        )
    keys = [k for k, _ in err.value.problems]
    assert "churn.availability.kind" in keys and "coordinator.deadline_s" in keys
    load_scenario(None, ["simulation.engine=flower", "churn.dropout.p=0.3"])  # expressible


def test_switching_the_strategy_drops_the_old_variants_keys():
    scn = load_scenario(
        "scenarios/fedprox_stragglers.toml",
        ["strategy.name=fedavg", "coordinator.straggler_policy=drop"],
    )
    assert scn.strategy.name == "fedavg" and scn.coordinator.straggler_policy == "drop"
    with pytest.raises(ScenarioError, match="proximal_mu"):
        load_scenario(None, ["strategy.name=fedavg", "strategy.proximal_mu=1"])


DROPOUT = [
    "run.rounds=2",
    "data.num_clients=6",
    "strategy.clients_per_round=6",
    "model.hidden=[16]",
    "client.epochs=1",
    "churn.dropout.p=0.4",
]


def test_dropouts_fail_the_same_clients_on_both_engines(tmp_path, _ray_session):
    from fedsim.engine.ray_runtime import start_ray
    from fedsim.runner import execute

    outs = []
    for engine in ("fedsim", "flower"):
        start_ray()  # Flower's runtime shuts the session's Ray down when it ends
        scn = load_scenario(None, [*DROPOUT, f"simulation.engine={engine}"])
        outs.append(execute(scn, out=tmp_path / engine).out_dir)
    a, b = (read_metrics(o) for o in outs)
    assert without_timing(a) == without_timing(b)
    assert sum(r["clients_dropped"] for r in a) > 0
    assert all(r["clients_failed"] == 0 for r in a)
    pa = read_participation(outs[0] / "participation.csv")
    pb = read_participation(outs[1] / "participation.csv")
    assert all(np.array_equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert (pa[2] == STATUSES.index("dropped")).sum() == sum(r["clients_dropped"] for r in a)
    assert {p.name for p in outs[0].iterdir()} >= {"participation.png", "online.png"}


def test_cli_too_few_online_exits_nonzero_with_one_clear_line(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("client_id,online_start_s,online_end_s\n0,1e9,2e9\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim.cli",
            "run",
            "--out",
            str(tmp_path / "run"),
            "--set",
            "churn.availability.kind=trace",
            "--set",
            f"churn.availability.path='{trace}'",
            "--set",
            "coordinator.max_wait_s=600",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "only 0 client(s) online" in proc.stderr and "Traceback" not in proc.stderr
    err = (tmp_path / "run.incomplete" / "error.txt").read_text()
    assert "max_wait_s" in err
    json.dumps(err)
