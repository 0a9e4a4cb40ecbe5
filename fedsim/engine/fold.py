"""Folding a cohort's replies into one weighted-mean reply, before the strategy sees it.

For strategies whose aggregate depends on the replies only through their
``num-examples``-weighted mean (FedAvg, FedProx, FedAvgM, FedAdam/Yogi/Adagrad), the
coordinator hands the strategy a single reply carrying that mean, with ``num-examples``
= the total. The strategy's own code then runs unchanged (its weight is exactly 1.0).
The arithmetic is Flower's ``aggregate_arrayrecords`` / ``aggregate_metricrecords``
step for step (same order, same float32/float64 operations), so results are identical;
what changes is the cost: arrays are read straight from their bytes and summed once,
instead of through Flower's per-access record copies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

WEIGHT_KEY = "num-examples"


def array_view(arr: Array) -> np.ndarray:
    """A read-only numpy view of a Flower ``Array`` (npy bytes) without copying."""
    data = arr.data
    if arr.stype != "numpy.ndarray" or data[:6] != b"\x93NUMPY":
        return arr.numpy()
    major = data[6]
    size = 2 if major == 1 else 4
    hlen = int.from_bytes(data[8 : 8 + size], "little")
    header = data[8 + size : 8 + size + hlen]
    if b"'fortran_order': True" in header:
        return arr.numpy()
    return np.frombuffer(data, dtype=np.dtype(arr.dtype), offset=8 + size + hlen).reshape(arr.shape)


def _records(content: RecordDict) -> tuple[ArrayRecord | None, MetricRecord]:
    arrays = metrics = None
    for rec in content.values():
        if arrays is None and isinstance(rec, ArrayRecord):
            arrays = rec
        elif metrics is None and isinstance(rec, MetricRecord):
            metrics = rec
    if metrics is None or WEIGHT_KEY not in metrics:
        raise ValueError(f"a reply has no MetricRecord with '{WEIGHT_KEY}'")
    return arrays, metrics


def num_examples(reply: Message) -> float:
    """The reply's ``num-examples`` (the weight every Flower strategy averages by)."""
    return float(_records(reply.content)[1][WEIGHT_KEY])  # type: ignore[arg-type]


def fold_weighted_mean(
    replies: list[Message], *, with_arrays: bool, reply_to: Message
) -> Message | None:
    """One reply with the example-weighted mean of the successful replies (or None).

    ``replies`` must already be in aggregation order (by client id); the result is a
    reply to ``reply_to`` (one of the phase's instructions; strategies read content only).
    """
    parts = [_records(r.content) for r in replies if not r.has_error()]
    if not parts:
        return None
    weights = [float(m[WEIGHT_KEY]) for _, m in parts]  # type: ignore[arg-type]
    total = sum(weights)
    factors = [w / total for w in weights]

    agg_metrics: dict[str, Any] = {}
    for (_, m), f in zip(parts, factors, strict=True):
        for key, value in m.items():
            if key == WEIGHT_KEY:
                continue
            if isinstance(value, list):
                prev = agg_metrics.get(key)
                scaled = [v * f for v in value]
                agg_metrics[key] = (
                    scaled if prev is None else [a + b for a, b in zip(prev, scaled, strict=True)]
                )
            else:
                agg_metrics[key] = (
                    value * f if key not in agg_metrics else agg_metrics[key] + value * f
                )
    w_total = int(total) if all(isinstance(m[WEIGHT_KEY], int) for _, m in parts) else total
    agg_metrics[WEIGHT_KEY] = w_total
    content: dict[str, Any] = {"metrics": MetricRecord(agg_metrics)}

    if with_arrays:
        agg: dict[str, np.ndarray] = {}
        for (arrays, _), f in zip(parts, factors, strict=True):
            if arrays is None:
                raise ValueError("a training reply carries no ArrayRecord")
            for key, arr in arrays.items():
                if key not in agg:
                    agg[key] = array_view(arr) * f
                else:
                    agg[key] += array_view(arr) * f
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in agg.items()})
    return Message(RecordDict(content), reply_to=reply_to)
