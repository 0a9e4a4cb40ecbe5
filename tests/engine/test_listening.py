"""Nothing exposed: every process of a run (the driver, Ray's GCS, raylet, agents and
workers, Flower's runtime) listens on loopback only, whatever the import order: the
CLI, the library, and a script or notebook that imported ``ray`` before fedsim.

Each variant is a real run in a subprocess; the test polls the listening sockets of its
whole process tree until it exits."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

SETS = ["run.rounds=3", "data.num_clients=6", "model.hidden=[8]"]

LIBRARY = """
import sys
{first}
from fedsim.runner import execute
from fedsim.scenario import load_scenario

scn = load_scenario(None, {sets!r})
execute(scn, out=__import__("pathlib").Path(sys.argv[1]))
"""


def _listening(tree: list[psutil.Process]) -> set[tuple[str, str, int]]:
    found = set()
    for proc in tree:
        try:
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                found.add((name, c.laddr.ip, c.laddr.port))
    return found


def _watch(cmd: list[str], timeout_s: float = 240.0) -> set[tuple[str, str, int]]:
    """Run ``cmd``; the listening sockets its process tree opened while it ran."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # as a user's shell has it
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    seen: set[tuple[str, str, int]] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            seen |= _listening(tree)
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert proc.returncode == 0, out[-3000:]
    return seen


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or addr).is_loopback


def _exposed(seen):
    return sorted(s for s in seen if not _loopback(s[1]))


def test_the_check_can_fail():
    assert _exposed({("x", "0.0.0.0", 1), ("y", "::", 2), ("z", "::ffff:10.0.0.2", 3)}) == [
        ("x", "0.0.0.0", 1),
        ("y", "::", 2),
        ("z", "::ffff:10.0.0.2", 3),
    ]
    assert not _exposed({("a", "127.0.0.1", 1), ("b", "::1", 2), ("c", "::ffff:127.0.0.1", 3)})


@pytest.mark.parametrize(
    ("how", "engine"),
    [
        ("cli", "fedsim"),
        ("library", "fedsim"),
        ("ray imported first", "fedsim"),
        ("ray imported first", "flower"),
    ],
)
def test_no_process_of_a_run_listens_beyond_loopback(tmp_path, how, engine):
    sets = [*SETS, f"simulation.engine={engine}"]
    out = tmp_path / "run"
    if how == "cli":
        cmd = [str(Path(sys.executable).parent / "fedsim"), "run", "-q", "--out", str(out)]
        cmd += [a for s in sets for a in ("--set", s)]
    else:
        first = "import ray" if how == "ray imported first" else ""
        script = tmp_path / "script.py"
        script.write_text(LIBRARY.format(first=first, sets=sets))
        cmd = [sys.executable, str(script), str(out)]
    seen = _watch(cmd)
    assert any(name.startswith(("gcs_server", "raylet")) for name, _, _ in seen), seen
    assert not _exposed(seen), _exposed(seen)
    assert Path(out, "model.safetensors").exists()
