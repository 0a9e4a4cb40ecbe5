"""A scenario run with Flower's own tools: ``flower-superlink`` (TLS, SuperNode
authentication) started by hand, the nodes registered with ``flwr supernode register``,
one node Flower's own ``flower-supernode`` (its ClientApp in a fresh ``flwr-clientapp``
process per message) and two ``fedsim node``, the run submitted with ``flwr run`` of the
directory ``fedsim app`` wrote. The run folder lands where ``fedsim app --runs`` said,
and its model is the simulation's (same seed, same partitions). On loopback: the
namespace test covers the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsim.deploy.credentials import make_credentials
from fedsim.deploy.processes import free_port
from fedsim.runner import execute
from fedsim.scenario import default_scenario_path, load_scenario

from .conftest import Hosts, fedsim

BASE = ["data.num_clients=3", "run.seed=7", "run.rounds=2"]


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory, _ray_session):
    work = tmp_path_factory.mktemp("flwr")
    creds = make_credentials(work / "creds", hosts=["127.0.0.1"], nodes=3)
    fleet, http = free_port(), free_port()
    home = work / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n[superlink.local]\n'
        f'address = "127.0.0.1:{http}"\nroot-certificates = "{creds.ca}"\n'
    )
    env_before = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(home)  # (the processes spawned below inherit it)
    out: dict = {"runs": work / "runs"}
    try:
        with Hosts(3, work, netns=False) as hosts:
            hosts.spawn(
                "superlink",
                None,
                [
                    _bin("flower-superlink"),
                    "--ssl-ca-certfile", str(creds.ca),
                    "--ssl-certfile", str(creds.server_cert),
                    "--ssl-keyfile", str(creds.server_key),
                    "--enable-supernode-auth",
                    "--fleet-api-address", f"127.0.0.1:{fleet}",
                    "--host", "127.0.0.1",
                    "--port", str(http),
                    "--disable-runtime-dependency-installation",
                ],
            )  # fmt: skip
            for k in range(3):
                deadline = time.monotonic() + 60
                while True:  # (until the SuperLink's Control API answers)
                    reg = subprocess.run(
                        [_bin("flwr"), "supernode", "register", str(creds.node_key(k)) + ".pub"],
                        capture_output=True,
                        text=True,
                        timeout=60,
                    )
                    if reg.returncode == 0 or time.monotonic() > deadline:
                        break
                    time.sleep(1)
                assert reg.returncode == 0, reg.stdout + reg.stderr
            hosts.spawn(
                "node0-flower",
                0,
                [
                    _bin("flower-supernode"),
                    "--superlink", f"127.0.0.1:{fleet}",
                    "--root-certificates", str(creds.ca),
                    "--auth-supernode-private-key", str(creds.node_key(0)),
                    "--node-config", "partition-id=0",
                    "--host", "127.0.0.1",
                    "--port", str(free_port()),  # (its own Runtime API, for its ClientApps)
                ],
            )  # fmt: skip
            for k in (1, 2):
                hosts.spawn(
                    f"node{k}",
                    k,
                    fedsim(
                        "node",
                        "--superlink", f"127.0.0.1:{fleet}",
                        "--partition-id", str(k),
                        "--root-certificates", str(creds.ca),
                        "--key", str(creds.node_key(k)),
                    ),
                )  # fmt: skip
            made = subprocess.run(
                fedsim(
                    "app",
                    str(default_scenario_path()),
                    str(work / "qs-app"),
                    "--runs",
                    str(out["runs"]),
                    *[x for s in BASE for x in ("--set", s)],
                ),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert made.returncode == 0, made.stderr
            run = hosts.spawn(
                "flwr-run", None, [_bin("flwr"), "run", str(work / "qs-app"), "--stream"]
            )
            out["run_rc"] = run.wait(timeout=420)
            out["run_log"] = hosts.log("flwr-run")
            out["superlink_log"] = hosts.log("superlink")
        out["leftovers"] = hosts.leftovers()
    finally:
        if env_before is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = env_before
    out["sim"] = execute(load_scenario(None, BASE), out=work / "sim").out_dir
    return out


def test_flwr_run_of_the_fedsim_app_gives_the_simulations_model(flower_run):
    assert flower_run["run_rc"] == 0, flower_run["run_log"][-3000:]
    folders = list(flower_run["runs"].iterdir())
    errors = [(f / "error.txt").read_text() for f in folders if (f / "error.txt").exists()]
    assert not errors, f"{errors}\n{flower_run['run_log'][-3000:]}"
    assert len(folders) == 1 and folders[0].name.startswith("quickstart-"), folders
    summary = json.loads((folders[0] / "summary.json").read_text())
    sim = json.loads((flower_run["sim"] / "summary.json").read_text())
    assert summary["model_sha256"] == sim["model_sha256"]
    assert (folders[0] / "participation.csv").read_text().count("aggregated") == 3 * 2
    assert "round 2/2" in flower_run["run_log"]  # (fedsim's progress, in Flower's log stream)


def test_nothing_flowers_tools_started_is_left(flower_run):
    assert flower_run["leftovers"] == []


def test_fedsim_run_refuses_a_scenario_for_flowers_superlink(tmp_path):
    r = subprocess.run(
        fedsim(
            "run", "--set", "simulation.engine=deployment", "--set", "deployment.superlink=flower",
            "--out", str(tmp_path / "r"),
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "deployment.superlink" in r.stderr and "flwr run" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("name", "why"), [("2bad_name", "start with a letter"), ("full", "not empty")]
)
def test_fedsim_app_refuses_a_folder_flower_cannot_use(tmp_path, name, why):
    target = tmp_path / name
    if name == "full":
        target.mkdir()
        (target / "keep.txt").write_text("x")
    r = subprocess.run(
        fedsim("app", str(default_scenario_path()), str(target)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (target / "pyproject.toml").exists()
