"""participation.csv (fedsim.world.participation) and the churn plots."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.plots import plot_online, plot_participation
from fedsim.world.participation import (
    HEADER,
    STATUSES,
    ParticipationLog,
    read_participation,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _lines(path):
    return path.read_text().splitlines()


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 2000  # a real figure, not an empty file


def test_full_rows_for_small_population(tmp_path):
    path = tmp_path / "participation.csv"
    online = np.array([True, False, True, True, False])
    with ParticipationLog(path, 5) as log:
        assert log.full
        # header is on disk before any round
        assert _lines(path) == [HEADER]
        log.add_round(1, online, {3: "aggregated", 0: "late"})
        # flushed per round: readable while the log is still open
        assert len(_lines(path)) == 1 + 5
        log.add_round(2, None, {4: "dropped", 1: "replied", 2: "selected"})
    assert log.closed
    assert _lines(path) == [
        "round,client_id,status",
        "1,0,late",
        "1,1,offline",
        "1,2,online",
        "1,3,aggregated",
        "1,4,offline",
        "2,0,online",
        "2,1,replied",
        "2,2,selected",
        "2,3,online",
        "2,4,dropped",
    ]


def test_empty_outcome_and_integer_mask(tmp_path):
    path = tmp_path / "p.csv"
    with ParticipationLog(path, 3) as log:
        log.add_round(7, np.array([0, 1, 0]), {})
    assert _lines(path)[1:] == ["7,0,offline", "7,1,online", "7,2,offline"]


def test_selected_only_for_large_population(tmp_path):
    path = tmp_path / "participation.csv"
    online = np.ones(50, dtype=bool)
    online[[5, 6]] = False
    with ParticipationLog(path, 50, max_full_clients=10) as log:
        assert not log.full
        log.add_round(1, online, {42: "aggregated", 7: "late", 0: "dropped"})
        log.add_round(2, None, {})
        log.add_round(3, None, {49: "replied"})
    assert _lines(path) == [
        HEADER,
        "1,0,dropped",
        "1,7,late",
        "1,42,aggregated",
        "3,49,replied",
    ]


def test_boundary_population_is_full(tmp_path):
    with ParticipationLog(tmp_path / "a.csv", 10, max_full_clients=10) as log:
        assert log.full
    with ParticipationLog(tmp_path / "b.csv", 11, max_full_clients=10) as log:
        assert not log.full


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("status", ["gone", "online", "offline", "", None])
def test_unknown_status_rejected(tmp_path, full, status):
    path = tmp_path / "p.csv"
    with (
        ParticipationLog(path, 4, max_full_clients=4 if full else 2) as log,
        pytest.raises(ValueError, match="status"),
    ):
        log.add_round(1, None, {0: "aggregated", 2: status})
    assert _lines(path) == [HEADER]  # nothing of the bad round was written


@pytest.mark.parametrize("full", [True, False])
def test_selected_while_offline_rejected(tmp_path, full):
    path = tmp_path / "p.csv"
    online = np.array([True, True, False, True])
    with ParticipationLog(path, 4, max_full_clients=4 if full else 2) as log:
        with pytest.raises(ValueError, match=r"\[2\].*offline"):
            log.add_round(1, online, {1: "aggregated", 2: "dropped"})
        log.add_round(2, online, {1: "aggregated", 3: "dropped"})  # still usable
    assert _lines(path)[0] == HEADER
    assert "2,1,aggregated" in _lines(path)
    assert not any(line.startswith("1,") for line in _lines(path))


def test_bad_ids_and_mask_rejected(tmp_path):
    with ParticipationLog(tmp_path / "p.csv", 4) as log:
        with pytest.raises(ValueError, match="outside the population"):
            log.add_round(1, None, {4: "aggregated"})
        with pytest.raises(ValueError, match="outside the population"):
            log.add_round(1, None, {-1: "aggregated"})
        with pytest.raises(ValueError, match="shape"):
            log.add_round(1, np.ones(3, dtype=bool), {0: "aggregated"})
    with pytest.raises(ValueError, match="closed"):
        log.add_round(2, None, {0: "aggregated"})
    log.close()  # idempotent


def test_read_participation_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    n, num_rounds = 30, 12
    path = tmp_path / "participation.csv"
    expected = []
    with ParticipationLog(path, n) as log:
        for rnd in range(1, num_rounds + 1):
            online = rng.random(n) < 0.7
            picked = rng.choice(np.flatnonzero(online), size=5, replace=False)
            outcome = {int(c): str(rng.choice(STATUSES[2:])) for c in picked}
            log.add_round(rnd, online, outcome)
            for c in range(n):
                status = outcome.get(c, "online" if online[c] else "offline")
                expected.append((rnd, c, STATUSES.index(status)))
    rounds, cids, codes = read_participation(path)
    assert rounds.shape == cids.shape == codes.shape == (n * num_rounds,)
    assert list(zip(rounds.tolist(), cids.tolist(), codes.tolist(), strict=True)) == expected
    assert set(codes.tolist()) == set(range(len(STATUSES)))  # every status occurred


def test_read_participation_empty_and_invalid(tmp_path):
    path = tmp_path / "p.csv"
    ParticipationLog(path, 3).close()
    rounds, cids, codes = read_participation(path)
    assert rounds.size == cids.size == codes.size == 0
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "\n1,0,vanished\n")
    with pytest.raises(ValueError):
        read_participation(bad)
    bad.write_text("a,b,c\n")
    with pytest.raises(ValueError, match="header"):
        read_participation(bad)


def test_full_mode_for_1000_clients_writes_every_row(tmp_path):
    n, num_rounds = 1000, 50
    rng = np.random.default_rng(1)
    masks = rng.random((num_rounds, n)) < 0.5
    outcomes = [{int(c): "aggregated" for c in np.flatnonzero(m)[:100]} for m in masks]
    with ParticipationLog(tmp_path / "p.csv", n) as log:
        for rnd in range(num_rounds):
            log.add_round(rnd + 1, masks[rnd], outcomes[rnd])
    rounds, cids, codes = read_participation(tmp_path / "p.csv")
    assert rounds.size == n * num_rounds
    assert (codes == STATUSES.index("aggregated")).sum() == 100 * num_rounds


def test_plot_participation_full(tmp_path):
    csv = tmp_path / "participation.csv"
    rng = np.random.default_rng(2)
    with ParticipationLog(csv, 20) as log:
        for rnd in range(1, 9):
            online = rng.random(20) < 0.6
            picked = np.flatnonzero(online)[:4]
            log.add_round(rnd, online, dict.fromkeys(picked.tolist(), "aggregated"))
    png = tmp_path / "participation.png"
    plot_participation(csv, png, 20)
    _assert_png(png)


def test_plot_participation_sampled_selected_only(tmp_path):
    csv = tmp_path / "participation.csv"
    n = 500
    with ParticipationLog(csv, n, max_full_clients=100) as log:
        for rnd in range(1, 6):
            picks = range(rnd, n, 37)
            log.add_round(rnd, None, {c: STATUSES[2 + c % 5] for c in picks})
    png = tmp_path / "participation.png"
    plot_participation(csv, png, n, max_clients=50)
    _assert_png(png)
    # an empty log still gives a figure
    empty_csv = tmp_path / "empty.csv"
    ParticipationLog(empty_csv, 10).close()
    plot_participation(empty_csv, tmp_path / "empty.png", 10)
    _assert_png(tmp_path / "empty.png")


@pytest.mark.parametrize("step_s", [30.0, 3600.0])
def test_plot_online(tmp_path, step_s):
    records = [
        {
            "round": r,
            "virtual_time_s": r * step_s,
            "clients_online": 80 + (r * 7) % 15,
            "clients_selected": 10,
            "clients_aggregated": None if r == 3 else 8,
        }
        for r in range(1, 11)
    ]
    records.append({"round": 11, "virtual_time_s": None, "clients_online": 5})
    png = tmp_path / "online.png"
    plot_online(records, png)
    _assert_png(png)
    plot_online([], tmp_path / "none.png")
    _assert_png(tmp_path / "none.png")
