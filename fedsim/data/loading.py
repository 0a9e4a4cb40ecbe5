"""The dataset spec union, a per-process federation cache, and a partition summary."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Annotated, Any

import numpy as np

import fedsim.data.digits
import fedsim.data.mnist
import fedsim.data.synthetic  # noqa: F401  (registers the built-in datasets)
from fedsim.data.federation import DATASETS, Federation
from fedsim.data.generated import GeneratedFederation
from fedsim.registry import Variants
from fedsim.sections import Section

# The [data] table: a union of every registered dataset, built from the registry. The
# imports above register the built-in ones.
DataSpec = Annotated[Section, Variants(DATASETS)]
AnyFederation = Federation | GeneratedFederation

#: partitions.json lists every client up to this many, else an even sample of them.
SUMMARY_MAX_CLIENTS = 10_000

#: A Ray worker hosts clients of one run (at most two scenarios side by side in tests).
CACHE_SIZE = 2

_cache: OrderedDict[tuple[str, int], AnyFederation] = OrderedDict()
_lock = threading.Lock()


def load_federation(spec: DataSpec, *, seed: int) -> AnyFederation:
    """Load ``spec`` with ``seed``, once per process: later calls return the same object.

    Keyed by ``(spec.model_dump_json(), seed)``; the least recently used of more than
    ``CACHE_SIZE`` entries is dropped. The arrays are read-only, so sharing is safe.
    """
    key = (spec.model_dump_json(), int(seed))
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
        fed = spec.load(seed=seed)
        _cache[key] = fed
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
        return fed


def clear_federation_cache() -> None:
    """Forget every cached federation (tests; freeing memory)."""
    with _lock:
        _cache.clear()


def partition_summary(fed: AnyFederation) -> dict[str, Any]:
    """JSON-ready sizes and train label histograms per client.

    Beyond ``SUMMARY_MAX_CLIENTS`` clients, an even sample of them (``"sampled": true``).
    """
    n = fed.num_clients
    if n > SUMMARY_MAX_CLIENTS:
        ids = np.unique(np.linspace(0, n - 1, SUMMARY_MAX_CLIENTS).round().astype(np.int64))
    else:
        ids = np.arange(n)
    test_sizes = fed.test_sizes()
    clients = []
    for i in ids.tolist():
        y = fed.train_labels(i)
        clients.append(
            {
                "client_id": i,
                "train_size": int(y.size),
                "test_size": int(test_sizes[i]),
                "label_histogram": [int(c) for c in np.bincount(y, minlength=fed.num_classes)],
            }
        )
    return {
        "num_clients": n,
        "num_classes": int(fed.num_classes),
        "sampled": bool(ids.size < n),
        "clients": clients,
    }
