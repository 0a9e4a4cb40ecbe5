"""The dataset spec union, a per-process federation cache, and a partition summary."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from fedsim.data.digits import DigitsData
from fedsim.data.federation import Federation
from fedsim.data.mnist import MnistData
from fedsim.data.synthetic import SyntheticData

DataSpec = Annotated[SyntheticData | DigitsData | MnistData, Field(discriminator="dataset")]

#: A Ray worker hosts clients of one run (at most two scenarios side by side in tests).
CACHE_SIZE = 2

_cache: OrderedDict[tuple[str, int], Federation] = OrderedDict()
_lock = threading.Lock()


def load_federation(spec: DataSpec, *, seed: int) -> Federation:
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


def partition_summary(fed: Federation) -> dict[str, Any]:
    """JSON-ready sizes and train label histograms per client."""
    clients = []
    for i, (train, test) in enumerate(zip(fed.train_idx, fed.test_idx, strict=True)):
        hist = np.bincount(fed.y[train], minlength=fed.num_classes)
        clients.append(
            {
                "client_id": i,
                "train_size": int(train.size),
                "test_size": int(test.size),
                "label_histogram": [int(c) for c in hist],
            }
        )
    return {"num_clients": fed.num_clients, "num_classes": int(fed.num_classes), "clients": clients}
