"""What a user sees when things go wrong: clear errors, nothing half-written, Ray stopped."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from fedsim.errors import ScenarioError
from fedsim.runner import execute
from fedsim.scenario import load_scenario

SMALL = ["run.rounds=2", "data.num_clients=4", "model.hidden=[8]"]


def test_private_ray_binds_to_loopback_only():
    code = (
        "import ray\n"
        "from fedsim.engine.ray_runtime import start_ray, stop_ray\n"
        "started, _ = start_ray()\n"
        "print(ray.nodes()[0]['NodeManagerAddress'])\n"
        "stop_ray(started)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "127.0.0.1"


def _alive_client_workers() -> set[str]:
    """Ids of the ClientWorker actors that Ray's control store lists as alive. The public
    state API (``ray.util.state``) needs the dashboard, which the test session runs
    without; the control store's actor table does not."""
    from ray._private import state

    return {
        actor_id
        for actor_id, actor in state.actors().items()
        if actor["ActorClassName"] == "ClientWorker" and actor["State"] == "ALIVE"
    }


def test_failed_run_leaves_an_incomplete_dir_with_the_error(tmp_path, monkeypatch, ray_cluster):
    def broken(*args, **kwargs):
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr("fedsim.engine.server.evaluate_model", broken)
    before = _alive_client_workers()  # another test's leftovers are not this run's
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation exploded"):
        execute(load_scenario(None, SMALL), out=out)
    assert not out.exists()
    incomplete = tmp_path / "run.incomplete"
    assert "evaluation exploded" in (incomplete / "error.txt").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    # The pool's actors are gone (the session's Ray itself stays up). ray.kill is
    # asynchronous: wait for the kills to land, then check.
    for _ in range(100):
        if not _alive_client_workers() - before:
            break
        time.sleep(0.1)
    assert _alive_client_workers() - before == set()


def test_resources_that_do_not_fit_are_a_scenario_error_before_any_output(tmp_path, ray_cluster):
    scn = load_scenario(None, [*SMALL, "simulation.client_resources.cpus=64"])
    with pytest.raises(ScenarioError, match="simulation.client_resources"):
        execute(scn, out=tmp_path / "run")
    assert list(tmp_path.iterdir()) == []
    scn = load_scenario(None, [*SMALL, "simulation.num_workers=64"])
    with pytest.raises(ScenarioError, match="simulation.num_workers"):
        execute(scn, out=tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    with pytest.raises(ScenarioError, match="is a file"):
        execute(load_scenario(None, SMALL), out=f)
    assert f.read_text() == "x"
