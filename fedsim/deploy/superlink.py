"""A real Flower SuperLink for a scenario, and the run that fedsim's coordinator drives
over it.

``SuperLink`` starts ``flower-superlink`` (TLS on, SuperNode authentication on, unless the
scenario says ``deployment.insecure``), registers the SuperNodes' public keys, and stops
it (and nothing else) at the end. ``DeployedRun`` creates a run on it, claims the
run's ServerApp task the way Flower's own ``flower-superexec`` does, and hands the
coordinator Flower's ``HttpGrid``: the coordinator, its policies, the strategy and the
run folder are exactly those of a simulation.

The SuperLink's HTTP API (Control and Runtime) has no account check in open-source
Flower, so fedsim binds it to loopback: only the coordinator's machine reaches it. The
SuperNodes reach the Fleet API (gRPC) at ``deployment.fleet_address``.

The run's Flower App Bundle holds only a ``pyproject.toml``: the ClientApp it names
(``clients.deployed:app``) is fedsim's own, installed on every node; the scenario travels
as run config (JSON text, never pickle), so every node runs the coordinator's scenario.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clients.deployed import SCENARIO_KEY
from fedsim.deploy.credentials import Credentials, node_public_keys
from fedsim.deploy.processes import FlowerProcess, free_port

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from fedsim.deploy.config import DeploymentSection
    from fedsim.scenario import Scenario

__all__ = [
    "CLIENT_APP",
    "RUNS_KEY",
    "SCENARIO_KEY",
    "DeployedRun",
    "SuperLink",
    "app_pyproject",
    "start_superlink",
]

log = logging.getLogger("fedsim.deploy")

CLIENT_APP = "clients.deployed:app"
SERVER_APP = "fedsim.deploy.serverapp:app"
RUNS_KEY = "fedsim-runs"  # (run config of a run Flower starts: where run folders go)
STARTUP_S = 60.0

# What the SuperLink logs when it turns a node away, and what fedsim says about it.
_REFUSED = (
    (
        "No SuperNode found with the given public key",
        "its public key is not registered (not in deployment.node_keys)",
    ),
    (
        "could not be activated",
        "a node with this key is still online (a restarted node joins once the old "
        "one's heartbeats lapse, about a minute after it died)",
    ),
)


def _http_client(api: str, address: str, *, insecure: bool, root_certificates: bytes | None) -> Any:
    """A client of the SuperLink's HTTP ``api``: "control" (as the flwr CLI) or
    "runtime" (as Flower's SuperExec)."""
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    cls, component = {
        "control": (ControlHttpClient, "flwr CLI"),
        "runtime": (RuntimeHttpClient, "SuperExec"),
    }[api]
    return cls.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=root_certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name=component)],
    )


class SuperLink:
    """``flower-superlink`` started for one run (a context manager).

    ``cfg`` is the scenario's ``[deployment]`` table; ``log_dir`` gets ``superlink.log``;
    a node's reply over ``max_message_bytes`` is refused as it arrives
    (``fedsim.deploy.fleet``).
    """

    def __init__(self, cfg: DeploymentSection, log_dir: Path, max_message_bytes: int) -> None:
        self.cfg = cfg
        self.max_message_bytes = max_message_bytes
        self.log_dir = Path(log_dir)
        self.http_address = f"127.0.0.1:{cfg.http_port or free_port()}"
        self.creds = None if cfg.insecure else Credentials(Path(cfg.credentials))
        self.process: FlowerProcess | None = None
        self.registered: dict[str, int] = {}
        self.cleanup: Callable[[], None] | None = None
        self.health_error = ""

    @property
    def insecure(self) -> bool:
        return self.creds is None

    @property
    def root_certificates(self) -> bytes | None:
        return None if self.creds is None else self.creds.ca.read_bytes()

    def argv(self) -> list[str]:
        cfg = self.cfg
        host, port = self.http_address.rsplit(":", 1)
        argv = [
            sys.executable,
            "-m",
            "fedsim.deploy.fleet",  # flower-superlink, its Fleet API bounded
            "--max-message-bytes",
            str(self.max_message_bytes),
            "--isolation",
            "process",  # fedsim's coordinator claims the ServerApp task itself
            "--fleet-api-address",
            cfg.fleet_address,
            "--host",
            host,
            "--port",
            port,
            "--disable-runtime-dependency-installation",
        ]
        if self.creds is None:
            return [*argv, "--insecure"]
        argv += [
            "--ssl-ca-certfile",
            str(self.creds.ca),
            "--ssl-certfile",
            str(self.creds.server_cert),
            "--ssl-keyfile",
            str(self.creds.server_key),
        ]
        if cfg.node_auth:
            argv.append("--enable-supernode-auth")
        return argv

    def control(self) -> Any:
        return _http_client(
            "control",
            self.http_address,
            insecure=self.insecure,
            root_certificates=self.root_certificates,
        )

    def _healthy(self) -> bool:
        import httpx

        scheme = "http" if self.insecure else "https"
        verify: Any = True
        if self.creds is not None:
            verify = str(self.creds.ca)
        try:
            r = httpx.get(f"{scheme}://{self.http_address}/health", timeout=1.0, verify=verify)
        except httpx.HTTPError as e:
            self.health_error = f"{type(e).__name__}: {e}"
            return False
        return r.is_success

    def __enter__(self) -> SuperLink:
        self.process = FlowerProcess(
            self.argv(), self.log_dir / "superlink.log", on_line=self._watch
        )
        try:
            try:
                self.process.wait_until(self._healthy, timeout_s=STARTUP_S, what="flower-superlink")
            except RuntimeError as e:
                if self.health_error:
                    e.add_note(f"(its HTTP API at {self.http_address}: {self.health_error})")
                raise
            if self.creds is not None and self.cfg.node_auth:
                self.register_nodes(Path(self.cfg.node_keys or self.creds.root / "nodes"))
        except BaseException:
            self.process.stop()
            raise
        log.info("SuperLink up: Fleet API at %s", self.cfg.fleet_address)
        return self

    def _watch(self, line: str) -> None:
        """Say on fedsim's stderr what the SuperLink refused (it keeps serving the others)."""
        for needle, what in _REFUSED:
            if needle in line:
                print(f"fedsim: the SuperLink refused a node: {what}", file=sys.stderr)

    def register_nodes(self, folder: Path) -> dict[str, int]:
        """Register every ``*.pub`` key in ``folder`` (a node without one is refused)."""
        from flwr.proto.control_pb2 import RegisterNodeRequest

        ctl = self.control()
        for name, pem in node_public_keys(folder).items():
            res = ctl.RegisterNode(RegisterNodeRequest(public_key=pem, name=name))
            self.registered[name] = int(res.node_id)
        return dict(self.registered)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.process is not None:
            self.process.stop()
        if self.cleanup is None:
            return
        if exc is None:
            self.cleanup()
        else:  # a failed or stopped run keeps the SuperLink's log, and says where
            print(
                f"fedsim: the SuperLink's log is kept at {self.log_dir / 'superlink.log'}",
                file=sys.stderr,
            )


def app_pyproject(scenario_json: str, *, name: str = "fedsim-run", runs: str | None = None) -> str:
    """A Flower app's ``pyproject.toml`` naming fedsim's apps, with the scenario (JSON,
    written as a TOML basic string) as run config, and for a run that Flower starts
    (``fedsim app``), the folder its run folders go to on the SuperLink's machine."""
    config = f"{json.dumps(SCENARIO_KEY)} = {json.dumps(scenario_json, ensure_ascii=True)}\n"
    if runs is not None:
        config += f"{json.dumps(RUNS_KEY)} = {json.dumps(runs, ensure_ascii=True)}\n"
    return (
        "[project]\n"
        f"name = {json.dumps(name)}\n"
        'version = "1.0.0"\n'
        'description = "A fedsim scenario as a Flower app (fedsim is installed where it runs)"\n'
        'license = "Apache-2.0"\n'
        "[tool.flwr.app]\n"
        'publisher = "fedsim"\n'
        "[tool.flwr.app.components]\n"
        f'serverapp = "{SERVER_APP}"\n'
        f'clientapp = "{CLIENT_APP}"\n'
        "[tool.flwr.app.config]\n" + config
    )


def fab_bytes(scenario_json: str) -> bytes:
    """The run's Flower App Bundle: only its ``pyproject.toml`` (``app_pyproject``)."""
    from flwr.cli.build import build_fab_from_files

    fab, _ = build_fab_from_files({"pyproject.toml": app_pyproject(scenario_json).encode()})
    return fab


class DeployedRun:
    """A run on a SuperLink, driven by this process (a context manager).

    Entering creates the run, claims its ServerApp task and opens the ``grid``; a
    heartbeat keeps the claim alive. Leaving reports the run completed (or failed).
    """

    def __init__(
        self,
        http_address: str,
        scenario_json: str,
        *,
        insecure: bool,
        root_certificates: bytes | None,
        max_reply_bytes: int,
        max_pull_s: float | None = None,
    ) -> None:
        self.max_reply_bytes = max_reply_bytes
        self.max_pull_s = max_pull_s
        self.http_address = http_address
        self.scenario_json = scenario_json
        self.insecure = insecure
        self.root_certificates = root_certificates
        self.run_id: int | None = None
        self.grid: Grid | None = None
        self._stack = ExitStack()

    def __enter__(self) -> DeployedRun:
        from flwr.common.serde import fab_to_proto, run_from_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest
        from flwr.supercore.constant import TaskType
        from flwr.supercore.fab import Fab
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.task_identity import TaskIdentity

        from fedsim.deploy.grid import BoundedHttpGrid

        kw = {"insecure": self.insecure, "root_certificates": self.root_certificates}
        ctl = _http_client("control", self.http_address, **kw)
        fab = fab_bytes(self.scenario_json)
        res = ctl.StartRun(
            StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})))
        )
        self.run_id = int(res.run_id)
        runtime = _http_client("runtime", self.http_address, **kw)
        deadline = time.monotonic() + STARTUP_S
        while True:  # the oldest pending ServerApp task: the run just made
            acq = runtime.AcquireTask(
                AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP])
            )
            if acq.token:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"run {self.run_id}: its ServerApp task never came up")
            time.sleep(0.1)
        if acq.task.run_id != self.run_id:  # fedsim's own SuperLink holds no other run
            raise RuntimeError(
                f"the SuperLink handed out run {acq.task.run_id}'s task, not run {self.run_id}'s"
            )
        token = acq.token
        grid = BoundedHttpGrid(
            runtime_api_address=self.http_address,
            token=token,
            max_reply_bytes=self.max_reply_bytes,
            max_pull_s=self.max_pull_s,
            **kw,
        )
        self._stack.callback(grid.close)
        beat = HeartbeatSender(make_task_heartbeat_fn_http(grid._runtime_client))
        beat.start()
        self._stack.callback(beat.stop)
        task = grid._runtime_client.PullTaskInput(PullTaskInputRequest())
        grid.set_run(run_from_proto(task.run))
        # Flower stamps every Message with the claiming task's identity.
        TaskIdentity.task_id = task.task_id
        TaskIdentity.run_id = task.run.run_id
        TaskIdentity.node_id = task.context.node_id
        self.grid = grid
        self._runtime = grid._runtime_client
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        from flwr.common.constant import SubStatus
        from flwr.proto.runtime_pb2 import PushTaskOutputRequest

        try:
            if self.grid is not None:
                failed = exc is not None
                self._runtime.PushTaskOutput(
                    PushTaskOutputRequest(
                        sub_status=SubStatus.FAILED if failed else SubStatus.COMPLETED,
                        details=str(exc)[:500] if failed else "",
                    )
                )
        except Exception as e:  # the SuperLink may be gone already (it is stopped next)
            log.debug("could not report the run's end: %s", e)
        finally:
            self._stack.close()


def start_superlink(scn: Scenario, timings: dict[str, Any], max_message_bytes: int) -> SuperLink:
    """Start the scenario's SuperLink (entered; the caller exits it), refusing node
    replies over ``max_message_bytes``. Its log goes to a temporary folder, removed
    when the run ends well and otherwise kept and named (in the error of a SuperLink
    that fails to start, on stderr when the run fails or is stopped)."""
    import shutil
    import tempfile
    import warnings

    cfg = scn.deployment
    if cfg.insecure:
        warnings.warn(
            "deployment.insecure = true: the SuperLink runs without TLS and accepts any "
            "node (plain-text gRPC); use it on a machine you trust only",
            stacklevel=2,
        )
    logs = Path(tempfile.mkdtemp(prefix="fedsim-superlink-"))
    t0 = time.perf_counter()
    link = SuperLink(cfg, logs, max_message_bytes)
    link.__enter__()  # (on failure the error names the log, which stays)
    timings["superlink_start_s"] = time.perf_counter() - t0
    link.cleanup = lambda: shutil.rmtree(logs, ignore_errors=True)
    return link
