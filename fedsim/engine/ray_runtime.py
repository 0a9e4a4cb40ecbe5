"""Starting and stopping Ray for a run: dashboard off, loopback only, no usage stats."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

import ray

from fedsim.engine.transport import INLINE_RECORD_BYTES
from fedsim.errors import ScenarioError

#: Ray settings of a cluster fedsim starts. Call arguments and results up to
#: ``max_direct_call_object_size`` travel inside Ray's RPCs instead of through its object
#: store (Ray's default is 100 KiB). A worker's partial sums of a small model's phase
#: (tiny-100of1k: 3 to 5 arrays of 31 KB) then reach the driver without an object-store
#: put and fetch, and a global model up to the same size rides inline in each call as
#: ``fedsim.engine.transport`` intends. Measured on tiny-100of1k (benchmarks/README.md):
#: the gap between a worker's training call and its next call fell from 2.6-2.9 ms to
#: 1.1-1.4 ms a round. Larger models' sums still go through the object store.
SYSTEM_CONFIG = {"max_direct_call_object_size": INLINE_RECORD_BYTES}


def start_ray(*, address: str | None = None) -> tuple[bool, float]:
    """Start (or join) Ray unless already initialised; returns (started_here, seconds)."""
    if ray.is_initialized():
        return False, 0.0
    t0 = time.perf_counter()
    common = {
        "include_dashboard": False,
        "logging_level": logging.ERROR,
        "log_to_driver": False,
        "configure_logging": True,
    }
    # ray.init installs its own SIGTERM handler (a native stack dump, then exit 15);
    # keep the caller's, so a terminated run unwinds and marks its folder incomplete.
    main = threading.current_thread() is threading.main_thread()
    on_term = signal.getsignal(signal.SIGTERM) if main else None
    if address:
        _check_reachable(address)
        ray.init(address=address, **common)
    else:
        # A private single-machine cluster bound to loopback ("local": never the
        # cluster a stray RAY_ADDRESS variable points at).
        _loopback_only()
        ray.init(
            address="local",
            num_cpus=os.cpu_count() or 1,
            _node_ip_address="127.0.0.1",
            _system_config=SYSTEM_CONFIG,
            **common,
        )
    if main and on_term is not None:
        signal.signal(signal.SIGTERM, on_term)
    return True, time.perf_counter() - t0


def _loopback_only() -> None:
    """Keep every Ray server of a local cluster on 127.0.0.1.

    Ray binds its servers (GCS, raylet, workers, agents) to the node address, and on
    Linux replaces a loopback node address by the machine's external one unless
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which it reads once, when ``ray`` is first
    imported. ``fedsim.engine`` sets that variable before importing Ray; a script or
    notebook that imported ``ray`` first has read it unset, so the constant is set
    here too (the variable also reaches Ray's own processes). Ray's control plane has
    no authentication: ``tests/engine/test_listening.py`` fails if any process of a
    run listens on anything but loopback.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def stop_ray(started_here: bool) -> None:
    if started_here and ray.is_initialized():
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, when a cluster address is wrong."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise ScenarioError(
            [("simulation.ray_address", f"cannot reach a Ray cluster at {address!r}: {exc}")]
        ) from None


def check_fit(*, cpus: float, gpus: float, num_workers: int | None = None) -> int:
    """How many clients fit the cluster at once; ScenarioError when not even one does."""
    res = ray.cluster_resources()
    fit = int(res.get("CPU", 0) // cpus)
    if gpus > 0:
        fit = min(fit, int(res.get("GPU", 0) // gpus))
    if fit < 1:
        raise ScenarioError(
            [
                (
                    "simulation.client_resources",
                    f"cpus={cpus:g}, gpus={gpus:g} per client do not fit the Ray cluster "
                    f"({res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU)",
                )
            ]
        )
    if num_workers is not None and num_workers > fit:
        raise ScenarioError(
            [
                (
                    "simulation.num_workers",
                    f"{num_workers} workers need {num_workers * cpus:g} CPU / "
                    f"{num_workers * gpus:g} GPU; the Ray cluster fits {fit}",
                )
            ]
        )
    return fit
