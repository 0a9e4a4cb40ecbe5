"""Starting and stopping Ray for a run: dashboard off, loopback only, no usage stats."""

from __future__ import annotations

import logging
import os
import time

# Ray reports usage statistics unless told not to; a privacy tool does not phone home.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Keep today's behaviour (and silence Ray's FutureWarning about changing it).
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import ray  # noqa: E402


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
    if address:
        ray.init(address=address, **common)
    else:
        # A private single-machine cluster bound to loopback.
        ray.init(num_cpus=os.cpu_count() or 1, _node_ip_address="127.0.0.1", **common)
    return True, time.perf_counter() - t0


def stop_ray(started_here: bool) -> None:
    if started_here and ray.is_initialized():
        ray.shutdown()
