"""A scenario runs on an existing Ray cluster (simulation.ray_address).

The test starts its own two-node cluster on loopback with ``ray start --block`` (a head
and a second node process), runs ``fedsim run`` against it in a subprocess, and stops
exactly the processes it started (never ``ray stop``, which would stop every Ray on the
machine, the test session's own included).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], tmp: Path, name: str) -> subprocess.Popen:
    # fedsim's private Ray sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (single-node mode on
    # loopback); a real multi-node cluster must allow nodes to join.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    env.pop("RAY_ADDRESS", None)
    log = (tmp / f"{name}.log").open("w")
    return subprocess.Popen(
        [str(RAY), "start", "--block", "--disable-usage-stats", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def _wait_nodes(address: str, n: int, timeout: float = 90.0) -> None:
    code = (
        "import ray, sys\n"
        f"ray.init(address={address!r}, logging_level='ERROR')\n"
        "print(sum(1 for x in ray.nodes() if x['Alive']))\n"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(1)
    raise TimeoutError(f"Ray cluster at {address} did not reach {n} nodes")


@pytest.mark.skipif(not RAY.exists(), reason="ray CLI not installed")
def test_scenario_runs_on_an_existing_two_node_cluster(tmp_path):
    # `ray start` records its address in this file; put back what was there before.
    current = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
    before = current.read_bytes() if current.exists() else None
    port = _free_port()
    address = f"127.0.0.1:{port}"
    procs = [
        _start(
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                "--num-cpus=1",
                "--include-dashboard=false",
            ],
            tmp_path,
            "head",
        )
    ]
    try:
        _wait_nodes(address, 1)
        procs.append(
            _start(
                [f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1"],
                tmp_path,
                "node2",
            )
        )
        _wait_nodes(address, 2)
        out = tmp_path / "run"
        cmd = [
            sys.executable,
            "-m",
            "fedsim.cli",
            "run",
            "--out",
            str(out),
            "--set",
            f"simulation.ray_address={address}",
            "--set",
            "run.rounds=2",
            "--set",
            "data.num_clients=4",
            "--set",
            "model.hidden=[8]",
        ]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["ray_nodes"] == 2 and summary["workers"] == 2
        assert summary["rounds_completed"] == 2
    finally:
        for p in procs[::-1]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if before is None:
            current.unlink(missing_ok=True)
        else:
            current.write_bytes(before)
