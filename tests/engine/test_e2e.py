"""End-to-end runs on both engines: files on disk, reproducibility, engine agreement."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from fedsim.results import read_metrics, without_timing
from fedsim.runner import execute
from fedsim.scenario import load_scenario

SMALL = [
    "run.rounds=2",
    "data.num_clients=4",
    "strategy.clients_per_round=3",
    "strategy.evaluate_clients_per_round=2",
    "model.hidden=[16]",
    "client.epochs=1",
]
EXPECTED_FILES = {
    "scenario.toml",
    "metrics.jsonl",
    "summary.json",
    "model.safetensors",
    "partitions.json",
    "label_heatmap.png",
    "accuracy.png",
    "loss.png",
}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fedsim_runs(tmp_path_factory, _ray_session):
    from fedsim.engine.ray_runtime import start_ray

    start_ray()  # no-op unless a Flower run before us shut the session's Ray down
    base = tmp_path_factory.mktemp("e2e")
    scn = load_scenario(None, SMALL)
    return [execute(scn, out=base / f"run{i}") for i in range(2)]


def test_run_directory_holds_every_result(fedsim_runs):
    out = fedsim_runs[0].out_dir
    assert {p.name for p in out.iterdir()} >= EXPECTED_FILES
    records = read_metrics(out)
    assert [r["round"] for r in records] == [1, 2]
    required = {
        "round",
        "train_loss",
        "eval_loss",
        "eval_accuracy",
        "clients_selected",
        "clients_replied",
        "clients_failed",
        "round_wall_s",
    }
    assert all(required <= set(r) for r in records)
    assert records[0]["clients_selected"] == 3 and records[0]["clients_failed"] == 0
    summary = json.loads((out / "summary.json").read_text())
    # Two rounds of training beat the initial model (chance on 10 classes).
    assert records[-1]["eval_loss"] < records[0]["eval_loss"] < summary["initial_eval_loss"]
    assert records[-1]["eval_accuracy"] > summary["initial_eval_accuracy"] + 0.2
    for key in ("eval_accuracy", "eval_loss", "rounds_completed", "wall_s", "seed", "versions"):
        assert key in summary
    assert summary["rounds_completed"] == 2
    assert {"fedsim", "flwr", "ray", "torch"} <= set(summary["versions"])
    parts = json.loads((out / "partitions.json").read_text())
    assert len(parts["clients"]) == 4


def test_resolved_scenario_reruns_as_is(fedsim_runs):
    out = fedsim_runs[0].out_dir
    assert load_scenario(out / "scenario.toml") == load_scenario(None, SMALL)


def test_same_seed_gives_identical_metrics_and_model(fedsim_runs):
    a, b = (r.out_dir for r in fedsim_runs)
    assert without_timing(read_metrics(a)) == without_timing(read_metrics(b))
    assert _sha(a / "model.safetensors") == _sha(b / "model.safetensors")


def test_flower_engine_matches_fedsim_engine(fedsim_runs, tmp_path, ray_cluster):
    scn = load_scenario(None, [*SMALL, "simulation.engine=flower"])
    res = execute(scn, out=tmp_path / "flower")
    ref = fedsim_runs[0].out_dir
    assert without_timing(read_metrics(res.out_dir)) == without_timing(read_metrics(ref))
    assert _sha(res.out_dir / "model.safetensors") == _sha(ref / "model.safetensors")


def test_cli_run_subprocess_prints_final_accuracy(tmp_path):
    out = tmp_path / "cli-run"
    args = [sys.executable, "-m", "fedsim.cli", "run", "--out", str(out)]
    for s in SMALL:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "final accuracy" in proc.stdout and str(out) in proc.stdout
    assert "round 2/2" in proc.stdout  # plain progress lines when not a TTY
    assert (out / "model.safetensors").is_file()
