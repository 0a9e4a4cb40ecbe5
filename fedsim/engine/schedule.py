"""Which worker runs which clients of a phase, from each client's expected cost.

Two ways to cut a phase into one batch per worker: ``balance`` (longest processing time
first) where any assignment will do, and ``split_ranges`` (contiguous ranges of the
cohort) where the workers pre-fold the weighted sum by subtree and so need ranges.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

from flwr.app import Message

from fedsim.engine.transport import Batch


def balance(
    items: Sequence[tuple[int, Message]], n_bins: int, cost: Callable[[int], float]
) -> list[Batch]:
    """Longest-processing-time-first assignment of clients to workers (by cost)."""
    bins: list[Batch] = [[] for _ in range(n_bins)]
    heap = [(0.0, i) for i in range(n_bins)]
    for cid, msg in sorted(items, key=lambda it: (-cost(it[0]), it[0])):
        load, i = heapq.heappop(heap)
        bins[i].append((cid, msg))
        heapq.heappush(heap, (load + cost(cid), i))
    for b in bins:
        b.sort(key=lambda it: it[0])
    return bins


def split_ranges(costs: Sequence[float], n_bins: int) -> list[tuple[int, int]]:
    """Cut positions ``0..len(costs)`` into ``n_bins`` contiguous ranges of near-equal cost.

    Each cut goes where the running cost is closest to an equal share, so a range is
    off its share by at most one client's cost (LPT balancing does not need ranges, but
    pre-folding by subtree does).
    """
    total = float(sum(costs))
    bounds = [0]
    acc = 0.0
    pos = 0
    for b in range(1, n_bins):
        target = total * b / n_bins
        while pos < len(costs) and abs(acc + costs[pos] - target) <= abs(acc - target):
            acc += costs[pos]
            pos += 1
        bounds.append(pos)
    bounds.append(len(costs))
    return [(bounds[i], bounds[i + 1]) for i in range(n_bins)]
