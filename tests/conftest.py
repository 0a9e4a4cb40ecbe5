"""Shared fixtures: one Ray instance for the whole session (2 CPUs, no dashboard)."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind to 127.0.0.1

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_MNIST = os.path.join(os.path.dirname(REPO), "shared", "data", "mnist")


def _init_ray() -> None:
    import logging

    import ray

    from fedsim.engine.ray_runtime import SYSTEM_CONFIG

    if not ray.is_initialized():
        ray.init(
            address="local",  # never a cluster some other test or user started
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _system_config=SYSTEM_CONFIG,  # (as fedsim starts its own)
            logging_level=logging.ERROR,
            log_to_driver=False,
        )


@pytest.fixture(scope="session")
def _ray_session():
    import ray

    _init_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def must_exit():
    """Processes a test expects to exit on their own by a deadline (say, Ray's agents,
    which try for 60 s to reach a killed GCS): ``must_exit(what, processes, deadline)``
    (a ``time.monotonic()`` time). Checked when the session ends, so that the test does
    not sit out the deadline; any still running then fails the session's teardown."""
    import time

    import psutil

    waiting: list[tuple[str, list, float]] = []
    yield lambda what, procs, deadline: waiting.append((what, procs, deadline))
    for what, procs, deadline in waiting:
        _, alive = psutil.wait_procs(procs, timeout=max(0.0, deadline - time.monotonic()))
        assert not alive, f"{what} still running: {[(p.pid, p.name()) for p in alive]}"


@pytest.fixture
def ray_cluster(_ray_session):
    """A running Ray; re-started if a test (Flower's runtime) shut it down."""
    _init_ray()
    yield


@pytest.fixture
def task_identity():
    """Flower's Message constructor reads the identity of the task running it."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
