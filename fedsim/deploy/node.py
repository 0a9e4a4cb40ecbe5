"""``fedsim node``: one client machine's Flower SuperNode, running fedsim's ClientApp.

It starts Flower's SuperNode (``flower-supernode`` from fedsim's environment, through
``fedsim.deploy.supernode``, which shortens its idle wait) with TLS to the SuperLink, the
node's authentication key, and the ``node_config`` that says whose data it holds, runs
the node's ClientApp tasks in its own executor (``executor.py``), and stays in the
foreground: its output is the SuperNode's; Ctrl-C or SIGTERM stops it and the SuperNode. A refusal by the SuperLink (an unregistered key, a certificate
that does not verify) ends it with one line saying which, and exit code 1.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedsim.deploy.processes import child_env, free_port

__all__ = ["NodeOptions", "node_argv", "run_node"]

# What flower-supernode prints when the SuperLink turns it away, and what fedsim says.
_REFUSALS = (
    (
        "Failed to activate SuperNode",
        "the SuperLink refused this node: its public key is not registered there "
        "(put its .pub in the coordinator's deployment.node_keys), or a node with this "
        "key is still online",
    ),
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the SuperLink's TLS certificate does not verify against --root-certificates",
    ),
    (
        "Ssl handshake failed",
        "the TLS handshake with the SuperLink failed (wrong --root-certificates, or the "
        "SuperLink's certificate is not valid for the address dialled)",
    ),
)


REJOIN_STEP_S = 5.0
STALE_ID = "Invalid node ID"
GAVE_UP = "Giving up reconnection"
GAVE_UP_GRACE_S = 5.0  # a SuperNode that gave up and is still there after this is stuck
LINK_CLOSED = "StatusCode.CANCELLED"  # (its stream to a SuperLink that stopped)
SILENT_S = 30.0  # a SuperNode silent this long after LINK_CLOSED is stuck
MIN_UP_S = 5.0  # a SuperNode that ran longer and ended by itself lost its SuperLink


@dataclass(frozen=True)
class NodeOptions:
    superlink: str
    partition_id: int
    root_certificates: Path | None = None
    auth_key: Path | None = None
    insecure: bool = False
    port: int | None = None
    max_wait_s: float = 15.0
    rejoin_wait_s: float = 90.0
    data_dir: Path | None = None  # the node's own data folder (else its partition)
    idle_poll_s: float = 0.5  # how often an idle SuperNode asks for work (Flower: 3 s)


def node_config(o: NodeOptions) -> str:
    """The SuperNode's ``--node-config``: whose data its ClientApp trains on."""
    conf = f"partition-id={o.partition_id}"
    if o.data_dir is not None:
        path = str(o.data_dir)  # a TOML string: literal ('...') unless the path has a '
        conf += f" data-dir='{path}'" if "'" not in path else f" data-dir={json.dumps(path)}"
    return conf


def node_argv(o: NodeOptions) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "fedsim.deploy.supernode",
        "--idle-poll",
        str(o.idle_poll_s),
        "--superlink",
        o.superlink,
        "--node-config",
        node_config(o),
        "--isolation",
        "process",  # its ClientApp tasks run in fedsim node's executor (executor.py)
        "--host",
        "127.0.0.1",  # the node's own Runtime API: for that executor only
        "--port",
        str(o.port),
    ]
    if o.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(o.root_certificates)]
    if o.auth_key is not None:
        argv += ["--auth-supernode-private-key", str(o.auth_key)]
    # A SuperNode that cannot reach its SuperLink for this long exits, and run_node
    # starts a fresh one: a new SuperLink (the next run) knows none of the old node ids,
    # which Flower's SuperNode would otherwise retry for ever.
    argv += ["--max-wait-time", str(o.max_wait_s)]
    return argv


def problems(o: NodeOptions) -> list[str]:
    out = []
    if not o.insecure and o.root_certificates is None:
        out.append("--root-certificates CA.pem is required (or --insecure, for a test)")
    for flag, path in (("--root-certificates", o.root_certificates), ("--key", o.auth_key)):
        if path is not None and not path.is_file():
            out.append(f"{flag}: {path} does not exist")
    if o.data_dir is not None and "'" in str(o.data_dir) and '"' in str(o.data_dir):
        out.append(f"--data: {o.data_dir}: a path with both ' and \" cannot be passed on")
    if not 0.05 <= o.idle_poll_s <= 60:
        out.append(f"--poll must be between 0.05 and 60 seconds, got {o.idle_poll_s}")
    if o.partition_id < 0:
        out.append(f"--partition-id must be >= 0, got {o.partition_id}")
    if o.port is not None and not 1 <= o.port <= 65535:
        out.append(f"--port must be between 1 and 65535, got {o.port}")
    return out


@dataclass
class _Watch:
    """What a SuperNode's output said: refusals, and whether it is stuck. Seen here:
    after losing its SuperLink, Flower's SuperNode sometimes neither retries nor exits,
    either after logging that it gives up (it should exit then) or silent after a
    cancelled stream (32 nodes outliving runs); it never dials the next SuperLink."""

    refused: list[str] = field(default_factory=list)
    renew: str = ""  # why this SuperNode is being replaced ("": it is not)
    gave_up_at: float | None = None
    closed_at: float | None = None  # when its SuperLink closed the stream, until more output
    stale_at: float | None = None  # when it was asked to stop (its node id went stale)
    killed: bool = False

    def see_stale(self, now: float) -> bool:
        """Its node id is unknown to the SuperLink: True the first time (stop it)."""
        if self.stale_at is not None:
            return False
        self.stale_at, self.renew = now, self.renew or "its node id is unknown to the SuperLink"
        return True

    def see(self, line: str, now: float) -> None:
        if LINK_CLOSED in line:
            self.closed_at = now
        elif "INFO" in line or "WARNING" in line:  # (it goes on: retries, or works)
            self.closed_at = None
        if GAVE_UP in line and self.gave_up_at is None:
            self.gave_up_at = now
        self.refused.extend(why for needle, why in _REFUSALS if needle in line)

    def stuck(self, now: float) -> str:
        """Why the SuperNode counts as stuck at ``now`` ("" while it does not)."""
        if self.gave_up_at is not None and now - self.gave_up_at > GAVE_UP_GRACE_S:
            return "gave up on its SuperLink and did not exit"
        if self.closed_at is not None and now - self.closed_at > SILENT_S:
            return "silent after its SuperLink closed"
        if self.stale_at is not None and now - self.stale_at > GAVE_UP_GRACE_S:
            return "did not stop when asked"
        return ""


def _run_once(
    o: NodeOptions, stopping: threading.Event, current: list[subprocess.Popen[str]]
) -> tuple[int, list[str], bool]:
    """One SuperNode (and executor) until it exits: (exit code, refusals seen, whether
    it was stopped to start afresh). ``current`` holds the SuperNode while it runs, for
    run_node's signal handler."""
    from clients.deployed import app
    from fedsim.deploy.executor import RECEIVED, serve_tasks

    # (In this process group: Ctrl-C in a terminal, or a kill of the group, reaches it.)
    proc = subprocess.Popen(
        node_argv(o),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=child_env(),
        text=True,
        errors="replace",
    )
    watch = _Watch()
    wake = threading.Event()  # a message is in: the executor asks for its task

    def relay() -> None:  # the SuperNode's output, watched
        assert proc.stdout is not None
        for line in proc.stdout:
            if RECEIVED in line:
                wake.set()
            sys.stdout.write(line)
            sys.stdout.flush()
            watch.see(line, time.monotonic())
            if STALE_ID in line and watch.see_stale(time.monotonic()):
                # A new SuperLink (the next run's) does not know the node id this
                # SuperNode got from the last one, and Flower's SuperNode retries with
                # it for ever: start a fresh one, which activates anew.
                proc.send_signal(signal.SIGTERM)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    stop = threading.Event()
    executor = threading.Thread(
        target=serve_tasks, args=(f"127.0.0.1:{o.port}", app, stop, wake), daemon=True
    )
    executor.start()

    current.append(proc)
    if stopping.is_set():  # (a signal came while it started)
        proc.send_signal(signal.SIGTERM)
    try:
        while True:
            try:
                code = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                why = watch.stuck(time.monotonic())
                if why and not watch.killed:
                    watch.killed, watch.renew = True, watch.renew or why
                    _kill_if_alive(proc, why)
    finally:
        current.clear()
        stop.set()
        wake.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        executor.join(timeout=5)
    return code, watch.refused, bool(watch.renew)


def _kill_if_alive(proc: subprocess.Popen[str], why: str) -> None:
    if proc.poll() is None:
        print(f"fedsim node: the SuperNode {why}; starting a fresh one", file=sys.stderr)
        proc.kill()


def run_node(o: NodeOptions) -> int:
    """Run the SuperNode and its ClientApp executor until stopped (Ctrl-C, SIGTERM) or
    refused; the exit code (1 on a refusal). A SuperNode that loses its SuperLink (it
    stopped, or a new one took its place) is replaced by a fresh one, so a node outlives
    a run and serves the next.

    A refused activation is tried again for ``o.rejoin_wait_s``: a node that crashed and
    came back is still online for the SuperLink until its heartbeats are missed (about
    a minute), and a node may dial before the coordinator has registered the keys.
    """
    o = dataclasses.replace(o, port=o.port or free_port())
    stopping = threading.Event()
    current: list[subprocess.Popen[str]] = []

    def forward(signum: int, frame: object) -> None:
        stopping.set()
        for proc in list(current):  # the SuperNode leaves the SuperLink cleanly
            proc.send_signal(signal.SIGTERM)

    # (For the whole life of the node, between SuperNodes too.)
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve(o, stopping, current)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _serve(o: NodeOptions, stopping: threading.Event, current: list[subprocess.Popen[str]]) -> int:
    first_refusal: float | None = None
    while not stopping.is_set():
        t0 = time.monotonic()
        code, refused, renew = _run_once(o, stopping, current)
        if stopping.is_set():
            break
        if not refused and (renew or time.monotonic() - t0 >= MIN_UP_S):
            print("fedsim node: lost the SuperLink; connecting afresh", file=sys.stderr)
            stopping.wait(1.0)
            continue
        if not refused:
            break
        now = time.monotonic()
        first_refusal = now if first_refusal is None else first_refusal
        if now - first_refusal >= o.rejoin_wait_s or "TLS" in refused[0]:
            break
        if now == first_refusal:
            print(
                f"fedsim node: {refused[0]}; trying again for up to {o.rejoin_wait_s:.0f} s "
                "(a restarted node is let in once its old self's heartbeats lapse)",
                file=sys.stderr,
            )
        stopping.wait(REJOIN_STEP_S)
    if stopping.is_set():
        return 0
    if refused:
        print(f"fedsim node: {refused[0]}", file=sys.stderr)
        return 1
    return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code
