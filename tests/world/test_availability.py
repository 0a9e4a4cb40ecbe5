"""Availability models and membership: statistics, trace replay, file errors, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedsim.errors import ScenarioError
from fedsim.world.availability import (
    AVAILABILITY,
    MarkovOnline,
    build_availability,
    build_membership,
)
from fedsim.world.config import (
    AlwaysAvailability,
    BernoulliAvailability,
    DiurnalAvailability,
    MarkovAvailability,
    MembershipSection,
    TraceAvailability,
)

HOUR = 3600.0


def masks(model, times) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.stack([model.online(t, q) for q, t in enumerate(times, start=1)])


def test_registry_names() -> None:
    assert AVAILABILITY.names() == ["always", "bernoulli", "diurnal", "markov", "trace"]


def test_always_is_none() -> None:
    m = build_availability(AlwaysAvailability(), num_clients=1_000_000, seed=0)
    assert m.online(0.0, 1) is None
    assert m.online(1e9, 2) is None


# ---------------------------------------------------------------- bernoulli


def test_bernoulli_mean_and_independence() -> None:
    m = build_availability(BernoulliAvailability(p_online=0.3), num_clients=1000, seed=1)
    on = masks(m, np.arange(50.0))
    assert on.shape == (50, 1000) and on.dtype == bool
    assert abs(on.mean() - 0.3) < 0.03
    # Every client has the same p: per-client frequencies spread only binomially.
    assert on.mean(axis=0).std() < 0.1
    # Redrawn per call, not frozen.
    assert not (on[0] == on[1]).all()


def test_bernoulli_concentration_spreads_clients_keeps_mean() -> None:
    spec = BernoulliAvailability(p_online=0.3, concentration=2.0)
    m = build_availability(spec, num_clients=1000, seed=1)
    on = masks(m, np.arange(50.0))
    assert abs(on.mean() - 0.3) < 0.03
    # Beta(0.6, 1.4) has std ~0.26; binomial noise over 50 draws alone is ~0.065.
    assert on.mean(axis=0).std() > 0.15


def test_bernoulli_p_one_with_concentration() -> None:
    spec = BernoulliAvailability(p_online=1.0, concentration=2.0)
    assert build_availability(spec, num_clients=10, seed=0).online(0.0, 1).all()


# ---------------------------------------------------------------- markov


def run_lengths(model, times: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:  # type: ignore[no-untyped-def]
    """Completed on and off runs per client (a run seen from its start to its end)."""
    n = model.num_clients
    prev = model.online(times[0], 1)
    since = np.full(n, np.nan)  # when the current run began; nan before the first switch
    on_runs: list[list[float]] = [[] for _ in range(n)]
    off_runs: list[list[float]] = [[] for _ in range(n)]
    for q, t in enumerate(times[1:], start=2):
        cur = model.online(t, q)
        changed = np.flatnonzero(cur != prev)
        for i in changed[~np.isnan(since[changed])]:
            (on_runs if prev[i] else off_runs)[i].append(t - since[i])
        since[changed] = t
        prev = cur
    return [np.asarray(r) for r in on_runs], [np.asarray(r) for r in off_runs]


def test_markov_mean_durations() -> None:
    on_s, off_s = 2 * HOUR, HOUR
    m = build_availability(
        MarkovAvailability(mean_on_s=on_s, mean_off_s=off_s), num_clients=2000, seed=3
    )
    times = np.arange(0.0, 60 * on_s, off_s / 50)
    on_runs, off_runs = run_lengths(m, times)
    on_all, off_all = np.concatenate(on_runs), np.concatenate(off_runs)
    assert on_all.size > 10_000 and off_all.size > 10_000
    assert on_all.mean() == pytest.approx(on_s, rel=0.1)
    assert off_all.mean() == pytest.approx(off_s, rel=0.1)


def test_markov_starts_stationary() -> None:
    m = build_availability(
        MarkovAvailability(mean_on_s=3 * HOUR, mean_off_s=HOUR), num_clients=20_000, seed=4
    )
    assert m.online(0.0, 1).mean() == pytest.approx(0.75, abs=0.02)
    assert m.online(100 * HOUR, 2).mean() == pytest.approx(0.75, abs=0.02)


def test_markov_spread_keeps_population_mean() -> None:
    spec = MarkovAvailability(mean_on_s=HOUR, mean_off_s=2 * HOUR, spread=1.0)
    big = build_availability(spec, num_clients=20_000, seed=5)
    assert isinstance(big, MarkovOnline)
    # Without the -sigma^2/2 correction these would be e^0.5 = 1.65 times too large.
    assert big.mean_on_s.mean() == pytest.approx(HOUR, rel=0.05)
    assert big.mean_off_s.mean() == pytest.approx(2 * HOUR, rel=0.05)
    assert big.mean_on_s.std() > 0.5 * HOUR

    # The simulated durations follow each client's own mean.
    m = build_availability(spec, num_clients=1000, seed=5)
    assert isinstance(m, MarkovOnline)
    on_runs, _ = run_lengths(m, np.arange(0.0, 100 * HOUR, HOUR / 20))
    measured = np.array([r.mean() if r.size >= 5 else np.nan for r in on_runs])
    ok = ~np.isnan(measured)
    order = np.argsort(m.mean_on_s[ok])
    q = order.size // 4
    slow, fast = measured[ok][order[-q:]], measured[ok][order[:q]]
    assert np.median(slow) > 3 * np.median(fast)
    ratio = measured[ok] / m.mean_on_s[ok]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.2)


def test_markov_long_jump_and_time_order() -> None:
    m = build_availability(
        MarkovAvailability(mean_on_s=60.0, mean_off_s=60.0), num_clients=5000, seed=6
    )
    m.online(0.0, 1)
    assert m.online(1e9, 2).mean() == pytest.approx(0.5, abs=0.03)  # restarts stationary
    with pytest.raises(ValueError, match="queried at"):
        m.online(10.0, 3)


# ---------------------------------------------------------------- diurnal


def test_diurnal_peak_and_trough() -> None:
    spec = DiurnalAvailability(p_min=0.1, p_max=0.8, peak_h=3.0, phase="normal", phase_std_h=0)
    m = build_availability(spec, num_clients=4000, seed=7)
    for day in range(3):
        peak, trough = m.online((24 * day + 3) * HOUR, 1), m.online((24 * day + 15) * HOUR, 2)
        assert peak.mean() == pytest.approx(0.8, abs=0.03)
        assert trough.mean() == pytest.approx(0.1, abs=0.03)
    midway = m.online(9 * HOUR, 3)
    assert midway.mean() == pytest.approx(0.45, abs=0.03)


def test_diurnal_phase_shift_and_period() -> None:
    # Offset +6 h: local 03:00 is at 21:00 virtual time.
    spec = DiurnalAvailability(
        p_min=0.0, p_max=1.0, peak_h=3.0, phase="normal", phase_mean_h=6.0, phase_std_h=0
    )
    m = build_availability(spec, num_clients=500, seed=8)
    assert m.online(21 * HOUR, 1).all()
    assert not m.online(9 * HOUR, 2).any()
    # A 1-hour cycle is read as a 24-hour clock: local 03:00 at 1/8 h, 15:00 at 5/8 h.
    fast = spec.model_copy(update={"period_s": HOUR, "phase_mean_h": 0.0, "slot_s": 150.0})
    m = build_availability(fast, num_clients=500, seed=8)
    assert m.online(HOUR / 8, 1).all() and not m.online(5 * HOUR / 8, 2).any()


def test_diurnal_uniform_phase_flat_and_slots_hold() -> None:
    spec = DiurnalAvailability(p_min=0.2, p_max=0.6, slot_s=900.0)
    m = build_availability(spec, num_clients=4000, seed=9)
    for h in (0, 5, 11, 17):
        assert m.online(h * HOUR, 1).mean() == pytest.approx(0.4, abs=0.03)
    a, b, c = m.online(1000.0, 1), m.online(1799.0, 2), m.online(1800.0, 3)
    assert (a == b).all()
    assert not (b == c).all()


# ---------------------------------------------------------------- trace


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def trace(path: str, n: int):  # type: ignore[no-untyped-def]
    return build_availability(TraceAvailability(path=path), num_clients=n, seed=0)


def test_trace_csv_intervals(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "t.csv",
        "client_id,online_start_s,online_end_s\n0,0,100\n2,50,150\n\n0,200,300\n3,10,inf\n",
    )
    m = trace(path, 5)
    expect = {
        0.0: [0],
        10.0: [0, 3],
        50.0: [0, 2, 3],
        99.9: [0, 2, 3],
        100.0: [2, 3],
        150.0: [3],
        200.0: [0, 3],
        300.0: [3],
        1e9: [3],
    }
    for q, (t, ids) in enumerate(expect.items(), start=1):
        assert np.flatnonzero(m.online(t, q)).tolist() == ids, t


def test_trace_csv_column_order_free(tmp_path: Path) -> None:
    path = write(tmp_path, "t.csv", "online_end_s,client_id,online_start_s\n5,1,2\n")
    m = trace(path, 2)
    assert m.online(3.0, 1).tolist() == [False, True]


def test_trace_fedscale_json(tmp_path: Path) -> None:
    raw = {
        "10": {"active": [0, 50], "inactive": [20, 70], "finish_time": 100, "model": "x"},
        "7": {"active": [30], "inactive": [40], "finish_time": 60, "duration": 1},
    }
    path = write(tmp_path, "t.json", json.dumps(raw, indent=1))
    m = trace(path, 5)
    # Sorted by int id: entry 0 = "7", entry 1 = "10"; clients 0, 2, 4 -> "7", 1, 3 -> "10".
    assert m.online(0.0, 1).tolist() == [False, True, False, True, False]
    assert m.online(30.0, 2).tolist() == [True, False, True, False, True]
    assert m.online(40.0, 3).tolist() == [False] * 5  # inactive is exclusive
    assert m.online(55.0, 4).tolist() == [False, True, False, True, False]
    # Wrap-around: 95 mod 60 = 35 ("7" on), 95 mod 100 = 95 ("10" off).
    assert m.online(95.0, 5).tolist() == [True, False, True, False, True]
    # 210 mod 100 = 10 ("10" on), 210 mod 60 = 30 ("7" on).
    assert m.online(210.0, 6).all()


def test_trace_json_more_entries_than_clients(tmp_path: Path) -> None:
    raw = {str(i): {"active": [i], "inactive": [i + 1], "finish_time": 100} for i in range(5)}
    m = trace(write(tmp_path, "t.json", json.dumps(raw)), 2)
    assert m.online(1.5, 1).tolist() == [False, True]


@pytest.mark.parametrize(
    ("name", "text", "expect"),
    [
        ("t.csv", "client,start,end\n0,1,2\n", "line 1: header"),
        ("t.csv", "client_id,online_start_s,online_end_s,x\n0,1,2,3\n", "line 1: header"),
        ("t.csv", "", "line 1: header"),
        ("t.csv", "client_id,online_start_s,online_end_s\n0,1,2\n1,abc,3\n", "line 3: online_start_s 'abc' is not a number"),
        ("t.csv", "client_id,online_start_s,online_end_s\n0,5,5\n", "line 2: online_start_s (5) must be < online_end_s"),
        ("t.csv", "client_id,online_start_s,online_end_s\n0,-1,5\n", "line 2: online_start_s must be >= 0"),
        ("t.csv", "client_id,online_start_s,online_end_s\n0,1,5\n4,1,5\n", "line 3: client_id 4 out of range"),
        ("t.csv", "client_id,online_start_s,online_end_s\n-1,1,5\n", "line 2: client_id -1 out of range"),
        ("t.csv", "client_id,online_start_s,online_end_s\n1.5,1,5\n", "line 2: client_id '1.5' is not an integer"),
        ("t.csv", "client_id,online_start_s,online_end_s\n0,1\n", "line 2: expected 3 fields"),
        ("t.csv", "client_id,online_start_s,online_end_s\n0,nan,5\n", "line 2: online_start_s must be a finite"),
        ("t.json", '{"0": {"active": [1],\n "inactive": [2]', "line 2: not valid JSON"),
        ("t.json", "[1, 2]", "line 1: expected a non-empty object"),
        ("t.json", '{"0": {"active": [1], "inactive": [2], "finish_time": 9},\n"a": {}}', "line 2: client 'a': id is not an integer"),
        ("t.json", '{"0": {"active": [1], "inactive": [2]}}', "needs 'active', 'inactive' and 'finish_time'"),
        ("t.json", '{"0": {"active": [1, 3], "inactive": [2], "finish_time": 9}}', "equal length"),
        ("t.json", '{"0": {"active": ["x"], "inactive": [2], "finish_time": 9}}', "must be numbers"),
        ("t.json", '{"0": {"active": [3], "inactive": [2], "finish_time": 9}}', "exceeds"),
        ("t.json", '{"0": {"active": [1], "inactive": [2], "finish_time": 0}}', "'finish_time' must be > 0"),
        ("t.pkl", "whatever", "convert the trace to JSON"),
        ("t.txt", "whatever", "expected a .csv or .json"),
    ],
)  # fmt: skip
def test_trace_bad_files(tmp_path: Path, name: str, text: str, expect: str) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(ScenarioError) as info:
        trace(path, 4)
    [(key, msg)] = info.value.problems
    assert key == "churn.availability.path"
    assert msg.startswith(path + ": ")
    assert expect in msg
    assert "\n" not in msg
    assert info.value.__suppress_context__


def test_trace_missing_file(tmp_path: Path) -> None:
    for name in ("nope.csv", "nope.json"):
        with pytest.raises(
            ScenarioError, match=r"churn\.availability\.path: .*nope.* no such file"
        ):
            trace(str(tmp_path / name), 4)


# ---------------------------------------------------------------- membership


def test_membership_default_is_none() -> None:
    mem = build_membership(MembershipSection(), num_clients=1_000_000, seed=0)
    assert mem.present(0.0) is None and mem.present(1e9) is None


def test_membership_initial_fraction_and_joins() -> None:
    spec = MembershipSection(initial_fraction=0.25, join_window_s=1000.0)
    mem = build_membership(spec, num_clients=1000, seed=1)
    at0 = mem.present(0.0)
    assert at0 is not None and at0.sum() == 250
    mid = mem.present(500.0)
    assert mid is not None and (mid >= at0).all()
    assert 250 + 750 * 0.5 - 60 < mid.sum() < 250 + 750 * 0.5 + 60
    assert mem.present(1000.0).all()  # type: ignore[union-attr]
    other = build_membership(spec, num_clients=1000, seed=2).present(0.0)
    assert not (other == at0).all()  # which clients start is seeded


def test_membership_lifetimes() -> None:
    spec = MembershipSection(mean_lifetime_s=100.0)
    mem = build_membership(spec, num_clients=5000, seed=3)
    assert mem.present(0.0).all()  # type: ignore[union-attr]
    assert mem.present(100.0).mean() == pytest.approx(np.exp(-1), abs=0.03)  # type: ignore[union-attr]
    assert not mem.present(1e6).any()  # type: ignore[union-attr]
    # Present clients only ever decrease with no late joiners.
    a, b = mem.present(50.0), mem.present(60.0)
    assert not (b & ~a).any()  # type: ignore[operator]


def test_membership_schedule_override(tmp_path: Path) -> None:
    path = write(tmp_path, "s.csv", "client_id,join_s,leave_s\n3,50,60\n5,0,\n")
    spec = MembershipSection(initial_fraction=0.5, join_window_s=10.0, schedule=path)
    mem = build_membership(spec, num_clients=8, seed=4)
    assert not mem.present(49.0)[3]  # type: ignore[index]
    assert mem.present(50.0)[3] and mem.present(59.9)[3]  # type: ignore[index]
    assert not mem.present(60.0)[3]  # type: ignore[index]
    assert mem.present(0.0)[5] and mem.present(1e9)[5]  # type: ignore[index]
    # Only a schedule, everyone else present throughout.
    only = build_membership(MembershipSection(schedule=path), num_clients=8, seed=4)
    assert only.present(0.0).tolist() == [True, True, True, False, True, True, True, True]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("client_id,join_s\n1,2\n", "line 1: header"),
        ("client_id,join_s,leave_s\n1,2,1\n", "line 2: leave_s (1) must be > join_s (2)"),
        ("client_id,join_s,leave_s\n1,2,\n1,3,\n", "line 3: client_id 1 listed twice"),
        ("client_id,join_s,leave_s\n9,2,\n", "line 2: client_id 9 out of range"),
        ("client_id,join_s,leave_s\n1,x,\n", "line 2: join_s 'x' is not a number"),
    ],
)
def test_membership_bad_schedule(tmp_path: Path, text: str, expect: str) -> None:
    path = write(tmp_path, "s.csv", text)
    with pytest.raises(ScenarioError) as info:
        build_membership(MembershipSection(schedule=path), num_clients=8, seed=0)
    [(key, msg)] = info.value.problems
    assert key == "churn.membership.schedule"
    assert expect in msg


def test_membership_missing_schedule(tmp_path: Path) -> None:
    spec = MembershipSection(schedule=str(tmp_path / "none.csv"))
    with pytest.raises(ScenarioError, match=r"churn\.membership\.schedule: .*no such file"):
        build_membership(spec, num_clients=8, seed=0)


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize(
    "spec",
    [
        BernoulliAvailability(p_online=0.4, concentration=1.0),
        MarkovAvailability(mean_on_s=300.0, mean_off_s=600.0, spread=0.5),
        DiurnalAvailability(slot_s=600.0),
    ],
    ids=lambda s: s.kind,
)
def test_same_seed_same_masks(spec) -> None:  # type: ignore[no-untyped-def]
    times = np.cumsum(np.random.default_rng(0).exponential(500.0, size=40))
    a = masks(build_availability(spec, num_clients=300, seed=11), times)
    b = masks(build_availability(spec, num_clients=300, seed=11), times)
    c = masks(build_availability(spec, num_clients=300, seed=12), times)
    assert (a == b).all()
    assert not (a == c).all()
    assert 0 < a.mean() < 1
