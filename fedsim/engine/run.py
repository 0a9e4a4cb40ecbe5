"""Run a scenario's ServerApp and ClientApp on the chosen engine."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flwr.app import Context, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

from clients.app import build_client_app
from fedsim.data import Federation
from fedsim.engine.coordinator import CoordinatorResult, RoundHook
from fedsim.engine.grid import RayGrid
from fedsim.engine.pool import WorkerPool, default_num_workers
from fedsim.engine.ray_runtime import start_ray, stop_ray
from fedsim.engine.server import ServerOutcome, build_server_app

if TYPE_CHECKING:
    from fedsim.scenario import Scenario


@dataclass
class EngineResult:
    coordinator: CoordinatorResult
    timings: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def quiet_flower(level: int = logging.ERROR) -> Iterator[None]:
    """Flower logs every round at INFO; fedsim shows its own progress instead."""
    logger = logging.getLogger("flwr")
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def run_engine(scn: Scenario, fed: Federation, on_round: RoundHook | None = None) -> EngineResult:
    if scn.simulation.engine == "flower":
        return _run_flower(scn, fed, on_round)
    return _run_fedsim(scn, fed, on_round)


def _finish(outcome: ServerOutcome, timings: dict[str, Any]) -> EngineResult:
    if outcome.error is not None:
        raise outcome.error
    if outcome.result is None:
        raise RuntimeError("the ServerApp ended without a result")
    return EngineResult(outcome.result, timings)


def _run_fedsim(scn: Scenario, fed: Federation, on_round: RoundHook | None) -> EngineResult:
    sim = scn.simulation
    started, ray_s = start_ray(address=sim.ray_address)
    timings: dict[str, Any] = {"ray_start_s": ray_s}
    pool = None
    try:
        t0 = time.perf_counter()
        res = sim.client_resources
        fit = default_num_workers(
            cpus=res.cpus, gpus=res.gpus, cap=max(scn.train_cohort, scn.eval_cohort, 1)
        )
        n = sim.num_workers or fit
        pool = WorkerPool(
            scn.model_dump_json(),
            num_workers=n,
            cpus=res.cpus,
            gpus=res.gpus,
            torch_threads=sim.torch_threads,
        )
        pool.warm()
        timings["workers"] = n
        timings["workers_start_s"] = time.perf_counter() - t0
        sizes = [len(i) for i in fed.train_idx]
        grid = RayGrid(pool, num_clients=scn.num_clients, cost=lambda cid: 1.0 + sizes[cid])
        outcome = ServerOutcome()
        app = build_server_app(scn, fed, outcome, on_round)
        context = Context(
            run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config={}
        )
        with quiet_flower():
            app(grid, context)
        return _finish(outcome, timings)
    finally:
        if pool is not None:
            pool.shutdown()
        stop_ray(started)


def _run_flower(scn: Scenario, fed: Federation, on_round: RoundHook | None) -> EngineResult:
    from flwr.simulation import run_simulation

    sim = scn.simulation
    # Start Ray ourselves (loopback, no dashboard) so Flower's backend joins it.
    started, ray_s = start_ray(address=sim.ray_address)
    try:
        outcome = ServerOutcome()
        server_app = build_server_app(scn, fed, outcome, on_round)
        client_app = build_client_app(scn.model_dump_json())
        res = sim.client_resources
        backend_config = {"client_resources": {"num_cpus": res.cpus, "num_gpus": res.gpus}}
        with quiet_flower():
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=scn.num_clients,
                backend_config=backend_config,
            )
        return _finish(outcome, {"ray_start_s": ray_s})
    finally:
        # Flower's Ray backend shuts Ray down itself; make sure nothing is left over.
        stop_ray(started)
