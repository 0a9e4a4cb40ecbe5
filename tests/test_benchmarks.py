"""CI smoke of the benchmark harness: 2 clients per round, every contender, one process each."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_harness_smoke_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--workloads",
        "smoke",
        "--reps",
        "1",
        "--rounds",
        "2",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fedsim/ideal" in proc.stdout and "flower/fedsim" in proc.stdout
    assert "2 pure loops at once" in proc.stdout
    doc = json.loads(out.read_text())
    row = doc["rows"]["smoke"]
    for c in ("pure", "pure2", "fedsim", "flower"):
        assert row[f"{c}_steady_s"] > 0 and row[f"{c}_peak_tree_mb"] > 0
    assert row["fedsim_ray_start_s"] > 0 and row["fedsim_over_ideal"] > 0
    assert row["fedsim_over_floor"] > 0 and row["floor_over_ideal"] > 0
    assert doc["raw"]["smoke"]["fedsim"][0]["round_s"].__len__() == 2


@pytest.fixture
def repo_benchmarks(monkeypatch):
    """Imports of ``benchmarks`` find the repository's (site-packages holds another
    top-level ``benchmarks``)."""
    monkeypatch.syspath_prepend(str(REPO))
    for mod in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, mod)


def test_paired_workloads_run_next_to_their_base_in_alternating_order(repo_benchmarks):
    from benchmarks.run import paired_ratio, schedule
    from benchmarks.workloads import WORKLOADS

    names = ["tiny-100of1k", "mlp", "tiny-dp", "mlp-dpsgd"]
    order = schedule(names, {n: list(WORKLOADS[n].contenders) for n in names}, reps=3)
    fedsim = [n for n, c in order if c == "fedsim"]
    # each repetition's pair is adjacent; base first, then second, then first again
    assert fedsim == [
        "tiny-100of1k", "tiny-dp", "tiny-dp", "tiny-100of1k", "tiny-100of1k", "tiny-dp",
        "mlp", "mlp-dpsgd", "mlp-dpsgd", "mlp", "mlp", "mlp-dpsgd",
    ]  # fmt: skip
    assert sum(1 for n, c in order if n == "mlp" and c == "flower") == 3
    # the ratio is the median of per-repetition ratios, not a ratio of medians
    raw = {
        "tiny-100of1k": {"fedsim": [{"steady_s": s} for s in (1.0, 2.0, 1.0)]},
        "tiny-dp": {"fedsim": [{"steady_s": s} for s in (1.1, 2.2, 1.0)]},
    }
    assert paired_ratio(raw, "tiny-dp") == 1.1
    assert paired_ratio(raw, "mlp-dpsgd") is None


def test_a_workloads_ratios_are_medians_of_each_repetitions_ratio(repo_benchmarks):
    from benchmarks.run import summarise

    def runs(*steady: float) -> list[dict]:
        keys = ("first_s", "ray_start_s", "peak_tree_mb", "peak_driver_mb")
        return [{"steady_s": s, "workers": 2, **dict.fromkeys(keys, 1.0)} for s in steady]

    # A slow spell in repetition 2 slows both; the ratio of medians would say 1.8 / 1.0.
    row = summarise(
        "tiny-100of1k",
        {"pure": runs(2.0, 4.0, 1.0), "pure2": runs(1.0, 2.0, 0.5), "fedsim": runs(1.5, 3.0, 1.8)},
    )
    assert row["fedsim_over_ideal"] == 1.5 and row["fedsim_over_floor"] == 1.5
    assert row["floor_over_ideal"] == 1.0 and row["ideal_s"] == 1.0


def test_a_steady_round_leaves_out_the_pipelines_fill_and_drain(repo_benchmarks):
    """fedsim's first round starts on idle workers and its last runs to the end of an
    evaluation no later round overlaps: neither is a period of the pipeline."""
    from benchmarks.run import steady_rounds

    assert steady_rounds([0.2, 0.09, 0.08, 0.1, 0.13]) == [0.09, 0.08, 0.1]
    assert steady_rounds([0.2, 0.09, 0.13]) == [0.09, 0.13]  # (too few to leave out two)
    assert steady_rounds([0.2]) == [0.2]


def test_the_per_client_scripts_run_and_print_their_numbers():
    # (benchmarks/README.md quotes them: they must keep running)
    for args, words in (
        (["benchmarks.client_overhead", "--phases", "1", "--items"], ["training, worker", "fold"]),
        (["benchmarks.dpsgd_client", "--reps", "3"], ["dp-sgd"]),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, cwd=REPO
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert all(w in proc.stdout for w in words), proc.stdout
