"""Run a scenario's ServerApp and ClientApp on the chosen engine."""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from flwr.app import Context, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

from clients.app import build_client_app
from fedsim.data import AnyFederation as Federation
from fedsim.deploy.superlink import DeployedRun, SuperLink, start_superlink
from fedsim.engine.checkpoint import Snapshot
from fedsim.engine.coordinator import (
    CheckpointHook,
    CoordinatorResult,
    ParticipationHook,
    RoundHook,
)
from fedsim.engine.grid import RayGrid
from fedsim.engine.malloc import keep_freed_buffers
from fedsim.engine.pool import WorkerPool
from fedsim.engine.ray_runtime import check_fit, start_ray, stop_ray
from fedsim.engine.server import ServerOutcome, build_server_app, reply_limit
from fedsim.world import World

if TYPE_CHECKING:
    from fedsim.scenario import Scenario


@dataclass
class EngineResult:
    coordinator: CoordinatorResult
    timings: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def quiet_flower(level: int = logging.CRITICAL) -> Iterator[None]:
    """Flower logs every round at INFO (and errors with tracebacks); fedsim reports itself."""
    logger = logging.getLogger("flwr")
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep everything alive now (modules, Ray, torch, the federation) out of the cyclic
    garbage collector's scans while the rounds run.

    Flower messages make cyclic garbage every round, so full collections keep coming,
    and each one walks every object of the process: measured, 180 ms stalls of the
    driver between a round's train and evaluate phases. Frozen objects are skipped.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class Engine:
    """Ray started (or joined) and the resources checked, before any run directory exists.

    ``with Engine(scn) as engine: engine.run(fed, world, on_round)``. Entering raises
    ScenarioError for an unreachable cluster or resources that do not fit; leaving stops
    the Ray instance it started.
    """

    def __init__(
        self, scn: Scenario, *, grid: Any = None, run_id: int = 0, fed: Federation | None = None
    ) -> None:
        """``grid``: a Flower grid the run is given (fedsim's ServerApp under Flower's
        own ``flwr run``, with ``deployment.superlink = "flower"``): no SuperLink is
        started, the coordinator drives that grid. ``fed``: the run's federation, which
        a deployment needs on entering (its SuperLink refuses replies over the
        federation's reply limit)."""
        self.scn = scn
        self._grid = grid
        self._run_id = run_id
        self._started = False
        self.timings: dict[str, Any] = {}
        self.fit = 0
        self._superlink: SuperLink | None = None
        self._fed = fed  # (its reply limit bounds what the SuperLink takes from a node)
        self._reply_limit: int | None = None  # (computed once: it builds the model)

    def __enter__(self) -> Engine:
        sim = self.scn.simulation
        if sim.engine == "deployment":
            if self._grid is None:
                if self._fed is None:
                    raise ValueError("a deployment's Engine needs the federation (fed=)")
                self._reply_limit = reply_limit(self.scn, self._fed)
                self._superlink = start_superlink(self.scn, self.timings, self._reply_limit)
            return self
        self._started, self.timings["ray_start_s"] = start_ray(address=sim.ray_address)
        try:
            res = sim.client_resources
            workers = sim.num_workers if sim.engine == "fedsim" else None
            self.fit = check_fit(cpus=res.cpus, gpus=res.gpus, num_workers=workers)
            self.timings["ray_nodes"] = sum(1 for n in ray.nodes() if n.get("Alive"))
        except BaseException:
            stop_ray(self._started)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._superlink is not None:
            self._superlink.__exit__(*exc)
            self._superlink = None
        stop_ray(self._started)

    def run(
        self,
        fed: Federation,
        world: World,
        on_round: RoundHook | None = None,
        on_participation: ParticipationHook | None = None,
        *,
        on_checkpoint: CheckpointHook | None = None,
        resume: Snapshot | None = None,
    ) -> EngineResult:
        """Run the scenario's rounds (after ``resume``'s round when given), calling the
        hooks as rounds end and checkpoints fall due."""
        self._on_participation = on_participation
        self._on_checkpoint = on_checkpoint
        self._resume = resume
        self._world = world
        if self.scn.simulation.engine == "flower":
            return self._run_flower(fed, on_round)
        if self.scn.simulation.engine == "deployment":
            return self._run_deployment(fed, on_round)
        return self._run_fedsim(fed, on_round)

    def _finish(self, outcome: ServerOutcome) -> EngineResult:
        if outcome.error is not None:
            raise outcome.error
        if outcome.result is None:
            raise RuntimeError("the ServerApp ended without a result")
        return EngineResult(outcome.result, dict(self.timings))

    def _run_fedsim(self, fed: Federation, on_round: RoundHook | None) -> EngineResult:
        scn, sim = self.scn, self.scn.simulation
        t0 = time.perf_counter()
        n = sim.num_workers or min(self.fit, max(scn.train_cohort, scn.eval_cohort, 1))
        pool = WorkerPool(
            scn.model_dump_json(),
            num_workers=n,
            cpus=sim.client_resources.cpus,
            gpus=sim.client_resources.gpus,
            torch_threads=sim.torch_threads,
        )
        try:
            keep_freed_buffers()
            pool.warm()
            self.timings["workers"] = n
            self.timings["workers_start_s"] = time.perf_counter() - t0
            sizes = fed.train_sizes()
            grid = RayGrid(
                pool, num_clients=scn.num_clients, cost=lambda cid: 1.0 + float(sizes[cid])
            )
            outcome = ServerOutcome()
            app = build_server_app(
                scn,
                fed,
                self._world,
                outcome,
                on_round,
                on_participation=self._on_participation,
                on_checkpoint=self._on_checkpoint,
                resume=self._resume,
            )
            context = Context(
                run_id=1,
                node_id=SUPERLINK_NODE_ID,
                node_config={},
                state=RecordDict(),
                run_config={},
            )
            with quiet_flower(), frozen_heap():
                app(grid, context)
            return self._finish(outcome)
        finally:
            pool.shutdown()

    def _run_deployment(self, fed: Federation, on_round: RoundHook | None) -> EngineResult:
        """The coordinator over a real SuperLink (started on entering): Flower's own
        HTTP grid to its Runtime API, the clients on the SuperNodes that joined."""
        outcome = ServerOutcome()
        app = build_server_app(
            self.scn,
            fed,
            self._world,
            outcome,
            on_round,
            # (with a stop event the coordinator polls the grid every 20 ms, not 3 s)
            stop=threading.Event(),
            on_participation=self._on_participation,
            on_checkpoint=self._on_checkpoint,
            resume=self._resume,
        )
        if self._grid is not None:  # Flower's run: its grid, its SuperLink
            context = Context(
                run_id=self._run_id,
                node_id=SUPERLINK_NODE_ID,
                node_config={},
                state=RecordDict(),
                run_config={},
            )
            with quiet_flower():
                app(self._grid, context)
            return self._finish(outcome)
        link, limit = self._superlink, self._reply_limit
        assert link is not None and limit is not None  # (both set on entering)
        with (
            DeployedRun(
                link.http_address,
                self.scn.model_dump_json(),
                insecure=link.insecure,
                root_certificates=link.root_certificates,
                max_reply_bytes=limit,
                max_pull_s=self.scn.deployment.round_timeout_s,
            ) as run,
            quiet_flower(),
        ):
            context = Context(
                run_id=run.run_id or 0,
                node_id=SUPERLINK_NODE_ID,
                node_config={},
                state=RecordDict(),
                run_config={},
            )
            app(run.grid, context)
            if outcome.error is not None:  # the run is reported failed, then re-raised
                raise outcome.error
        return self._finish(outcome)

    def _run_flower(self, fed: Federation, on_round: RoundHook | None) -> EngineResult:
        from flwr.simulation import run_simulation

        scn = self.scn
        stop = threading.Event()  # ends the ServerApp thread if the runtime fails
        outcome = ServerOutcome()
        server_app = build_server_app(
            scn,
            fed,
            self._world,
            outcome,
            on_round,
            stop=stop,
            on_participation=self._on_participation,
            on_checkpoint=self._on_checkpoint,
            resume=self._resume,
        )
        client_app = build_client_app(scn.model_dump_json())
        res = scn.simulation.client_resources
        backend_config = {"client_resources": {"num_cpus": res.cpus, "num_gpus": res.gpus}}
        try:
            with quiet_flower():
                run_simulation(
                    server_app=server_app,
                    client_app=client_app,
                    num_supernodes=scn.num_clients,
                    backend_config=backend_config,
                )
        finally:
            # Flower's ServerApp thread is not a daemon: make sure it ends with us.
            stop.set()
        # Flower's Ray backend shuts Ray down itself when it finishes.
        return self._finish(outcome)
