"""Coordinator policies on the virtual clock: over-commitment, deadlines, partial work
for stragglers, minimum replies.

Everything here is decided from the world's deterministic timing before any client
runs, so a round's outcome never depends on wall-clock timing, and the engine only runs
the clients whose work will be used (plus those that will drop out, so they fail for
real in the ClientApp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fedsim.world.system import Timing

AGGREGATED, REPLIED, DROPPED, LATE = "aggregated", "replied", "dropped", "late"


@dataclass
class RoundPlan:
    status: dict[int, str]  # each selected client's planned outcome
    arrival_s: dict[int, float]  # when its reply (or its failure) reaches the server
    max_steps: dict[int, int] = field(default_factory=dict)  # partial work
    duration_s: float = 0.0
    skipped: bool = False  # fewer than min_replies: the model stays as it is

    @property
    def to_run(self) -> list[int]:
        """Clients that get a task: the ones aggregated, and the ones that drop out."""
        return sorted(c for c, s in self.status.items() if s in (AGGREGATED, DROPPED))

    def count(self, status: str) -> int:
        return sum(1 for s in self.status.values() if s == status)


def select_count(k: int, over_commit: float, online: int) -> int:
    return min(math.ceil(k * over_commit - 1e-9), online)


def plan_round(
    cids: np.ndarray,
    timing: Timing,
    steps: np.ndarray,
    dropped: np.ndarray,
    *,
    k: int,
    deadline_s: float | None,
    partial: bool,
    min_replies: int,
    min_round_s: float,
) -> RoundPlan:
    """Who is aggregated, late or dropped, and how long the round lasts.

    The first ``k`` replies to arrive (ties by client id) that beat the deadline are
    aggregated; the round closes at the k-th arrival, or at the deadline if fewer make
    it, or when the last selected client has replied or failed.
    """
    total = timing.total.copy()
    max_steps: dict[int, int] = {}
    late = np.zeros(len(cids), dtype=bool)
    if deadline_s is not None:
        over = total > deadline_s
        if partial:
            # A straggler stops computing at the deadline (minus its upload) and returns
            # the whole optimizer steps it completed by then.
            per_step = timing.compute / np.maximum(steps, 1)
            budget = deadline_s - timing.download - timing.upload
            done = np.floor(np.maximum(budget, 0) / np.where(per_step > 0, per_step, np.inf))
            for i in np.flatnonzero(over & ~dropped):
                if done[i] >= 1:
                    max_steps[int(cids[i])] = int(done[i])
                    total[i] = timing.download[i] + done[i] * per_step[i] + timing.upload[i]
                else:
                    late[i] = True
        else:
            late = over & ~dropped
    status: dict[int, str] = {}
    arrival = {int(c): float(t) for c, t in zip(cids, total, strict=True)}
    ok = np.flatnonzero(~dropped & ~late)
    order = ok[np.lexsort((cids[ok], total[ok]))]
    first = order[:k]
    for i in np.flatnonzero(dropped):
        status[int(cids[i])] = DROPPED
    for i in np.flatnonzero(late):
        status[int(cids[i])] = LATE
    for i in order[k:]:  # arrive after the round closed at the k-th reply
        status[int(cids[i])] = LATE
    for i in first:
        status[int(cids[i])] = AGGREGATED
    if len(first) >= k and k > 0:
        end = float(total[first[-1]])
    else:
        end = float(total.max()) if len(total) else 0.0
        if deadline_s is not None:
            end = min(end, deadline_s)
    plan = RoundPlan(status, arrival, max_steps, max(end, min_round_s))
    if len(first) < min_replies:
        plan.skipped = True
        for i in first:
            status[int(cids[i])] = REPLIED
    return plan
