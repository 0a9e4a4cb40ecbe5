"""Hosts for the deployment tests: separate network namespaces joined by veth links when
this machine allows it (root and iproute2), else processes on loopback.

Topology (namespaces): one for the SuperLink (its address 10.77.0.1 on its loopback),
one per client node, each joined to the SuperLink's by its own veth pair
(10.77.K.1 <-> 10.77.K.2, the node's default route). Every process is started in its
own process group with a marker in its environment, so the teardown can kill them all
and the test can check that none is left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

LINK_IP = "10.77.0.1"
_DEFAULT_SIGINT = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execvp(sys.argv[1], sys.argv[1:])",
]
MARK = "FEDSIM_TEST_MARK"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _netns_works() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"fsprobe{os.getpid()}"
    try:
        ok = _ip("netns", "add", probe, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    if ok:
        _ip("netns", "del", probe, check=False)
    return ok


NETNS = _netns_works()


def pytest_report_header(config: pytest.Config) -> str:
    how = (
        "separate network namespaces joined by veth links"
        if NETNS
        else "loopback (this machine allows no network namespaces)"
    )
    return f"deployment tests run on: {how}"


class Hosts:
    """The SuperLink's host and ``nodes`` client hosts (namespaces, or loopback)."""

    def __init__(self, nodes: int, workdir: Path, *, netns: bool = NETNS) -> None:
        self.netns = netns
        self.nodes = nodes
        self.tag = f"{os.getpid() % 100000}"
        self.link_ns = f"fs{self.tag}l"
        self.node_ns = [f"fs{self.tag}n{k}" for k in range(nodes)]
        self.link_ip = LINK_IP if netns else "127.0.0.1"
        self.mark = uuid.uuid4().hex
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.made: list[str] = []

    @property
    def mode(self) -> str:
        return "netns" if self.netns else "loopback"

    def __enter__(self) -> Hosts:
        if not self.netns:
            return self
        try:
            _ip("netns", "add", self.link_ns)
            self.made.append(self.link_ns)
            _ip("-n", self.link_ns, "link", "set", "lo", "up")
            _ip("-n", self.link_ns, "addr", "add", f"{LINK_IP}/32", "dev", "lo")
            for k, ns in enumerate(self.node_ns, start=1):
                _ip("netns", "add", ns)
                self.made.append(ns)
                a, b = f"fs{self.tag}a{k}", f"fs{self.tag}b{k}"
                _ip("link", "add", a, "type", "veth", "peer", "name", b)
                _ip("link", "set", a, "netns", self.link_ns)
                _ip("link", "set", b, "netns", ns)
                _ip("-n", self.link_ns, "addr", "add", f"10.77.{k}.1/30", "dev", a)
                _ip("-n", ns, "addr", "add", f"10.77.{k}.2/30", "dev", b)
                _ip("-n", self.link_ns, "link", "set", a, "up")
                _ip("-n", ns, "link", "set", b, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "route", "add", "default", "via", f"10.77.{k}.1")
        except BaseException:
            self.__exit__()
            raise
        return self

    def spawn(self, name: str, host: int | None, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` on a host (None: the SuperLink's; K: client host K), logging
        to ``workdir/name.log``."""
        prefix: list[str] = []
        if self.netns:
            prefix = ["ip", "netns", "exec", self.link_ns if host is None else self.node_ns[host]]
        # Ctrl-C as in a terminal: a job started in the background of a shell without job
        # control (CI, `cmd &` in a script) has SIGINT ignored, and Python keeps it so.
        prefix = [*_DEFAULT_SIGINT, *prefix]
        env = dict(os.environ, **{MARK: self.mark, "PYTHONUNBUFFERED": "1"})
        with (self.workdir / f"{name}.log").open("ab") as log:
            p = subprocess.Popen(
                [*prefix, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def crash(self, name: str, host: int) -> None:
        """The client host ``host`` dies: every process on it gets SIGKILL at once (in
        namespace mode, every process in its namespace)."""
        if self.netns:
            pids = _ip("netns", "pids", self.node_ns[host]).stdout.split()
            for pid in pids:
                _kill(int(pid), signal.SIGKILL)
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=30)

    def cut(self, name: str, host: int) -> None:
        """Client host ``host`` loses the network: its veth link goes down (namespace
        mode; packets are lost, no connection is reset), or on loopback its processes
        are frozen (SIGSTOP), which the SuperLink sees the same way."""
        if self.netns:
            _ip("-n", self.link_ns, "link", "set", f"fs{self.tag}a{host + 1}", "down")
        else:
            _killpg(self.procs[name].pid, signal.SIGSTOP)

    def mend(self, name: str, host: int) -> None:
        """Undo ``cut``."""
        if self.netns:
            _ip("-n", self.link_ns, "link", "set", f"fs{self.tag}a{host + 1}", "up")
        else:
            _killpg(self.procs[name].pid, signal.SIGCONT)

    def running(self, program: str) -> list[int]:
        """Pids of this test's processes whose command line names ``program``."""
        found = []
        for env in Path("/proc").glob("[0-9]*/environ"):
            try:
                if f"{MARK}={self.mark}".encode() not in env.read_bytes():
                    continue
                cmd = (env.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if program in cmd:
                found.append(int(env.parent.name))
        return found

    def stop(self, name: str, *, grace_s: float = 20.0) -> int:
        p = self.procs[name]
        if p.poll() is None:
            _killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
        _killpg(p.pid, signal.SIGKILL)  # whatever of its group is left
        return p.returncode

    def leftovers(self) -> list[str]:
        """Processes (by the marker in their environment) and namespaces of this test
        that still exist."""
        left = []
        for env in Path("/proc").glob("[0-9]*/environ"):
            try:
                if f"{MARK}={self.mark}".encode() in env.read_bytes():
                    left.append(f"process {env.parent.name}")
            except OSError:
                continue
        if self.netns:
            names = _ip("netns", "list").stdout
            left += [f"namespace {ns}" for ns in self.made if ns in names]
        return left

    def __exit__(self, *exc: object) -> None:
        for name in list(self.procs):
            self.stop(name, grace_s=10)
        deadline = time.monotonic() + 30
        while self.netns and time.monotonic() < deadline:
            pids = [
                int(p)
                for ns in self.made
                for p in _ip("netns", "pids", ns, check=False).stdout.split()
            ]
            if not pids:
                break
            for pid in pids:
                _kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        for ns in reversed(self.made):  # (deleting one deletes its veth ends too)
            _ip("netns", "del", ns, check=False)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def wait_for(pred, timeout_s: float, what: str, *, every_s: float = 0.2) -> None:
    """Until ``pred()`` holds; an AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every_s)


def fedsim(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedsim.cli", *args]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``fedsim ARGS`` in ``cwd``, its output captured as text."""
    return subprocess.run(fedsim(*args), capture_output=True, text=True, cwd=cwd, timeout=120)
