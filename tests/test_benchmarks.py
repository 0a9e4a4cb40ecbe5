"""CI smoke of the benchmark harness: 2 clients per round, every contender, one process each."""

import json
import subprocess
import sys


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
