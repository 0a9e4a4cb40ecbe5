"""Folding a cohort's replies into one weighted-mean reply, before the strategy sees it.

For strategies whose aggregate depends on the replies only through their
``num-examples``-weighted mean (FedAvg, FedProx, FedAvgM, FedAdam/Yogi/Adagrad), the
coordinator hands the strategy a single reply carrying that mean, with ``num-examples``
= the total. The strategy's own code then runs unchanged (its weight is exactly 1.0).

Arrays are folded as updates: ``sum_i n_i * (x_i - w_t)`` over a **fixed pairwise tree**
on the clients' positions in the cohort (sorted by client id), divided by ``sum_i n_i``,
added to the global model ``w_t`` and cast back to its dtype. Updates are what
per-update transforms act on (clip, validate: ``fedsim.transforms``), and, being small
next to the weights, they lose less to rounding. Sums are kept in the array's own
floating dtype (float32 for float32 and narrower floats, float64 for float64 and for
integer arrays). A pairwise tree's rounding error bound grows with log2(K), not K, so
float32 sums stay within a few ulps of the exact mean while moving half the bytes of
float64 ones. The tree makes the sum streamable and splittable: a worker that hosts a
contiguous range of positions folds its clients as they finish into at most
~2 log2(K) partial sums of whole subtrees (``TreeFold``), and ``combine`` finishes the
same tree from any such pieces.
So the result is bit-identical whether the coordinator folds every reply itself
(Flower's runtime, real SuperNodes) or fedsim's workers pre-fold, for any number of
workers, and no more than O(log K) sums are ever held at once (in a worker, beside up
to ``fedsim.engine.worker.FOLD_AFTER_BYTES`` of replies waiting to be folded). (The
result agrees with Flower's ``aggregate_arrayrecords`` to float32 rounding, not bit for
bit.) Metrics are folded with Flower's ``aggregate_metricrecords`` arithmetic, in
client-id order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedsim.arrays import array_view, to_array

WEIGHT_KEY = "num-examples"


def array_record(content: RecordDict) -> ArrayRecord | None:
    """The content's first ArrayRecord (the model a message carries), if any."""
    return next((v for v in content.values() if isinstance(v, ArrayRecord)), None)


def with_model(content: RecordDict, arrays: ArrayRecord) -> RecordDict:
    """A copy of ``content`` whose model (its first ArrayRecord) is ``arrays``."""
    out, done = RecordDict(), False
    for key, rec in content.items():
        if isinstance(rec, ArrayRecord) and not done:
            rec, done = arrays, True
        out[key] = rec
    return out


def records(content: RecordDict) -> tuple[ArrayRecord | None, MetricRecord]:
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
    return float(records(reply.content)[1][WEIGHT_KEY])  # type: ignore[arg-type]


Sums = dict[str, np.ndarray]
Block = tuple[int, int, "Sums | None"]  # (level, index, sum): positions [i*2^l, (i+1)*2^l)


def sum_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a weighted sum of ``dtype`` arrays is kept in: the array's own floating
    dtype, at least float32; float64 for integer and boolean arrays."""
    if np.issubdtype(dtype, np.floating):
        return np.result_type(dtype, np.float32)
    return np.dtype(np.float64)


def update_of(arrays: ArrayRecord, base: ArrayRecord) -> Sums:
    """A client's update ``w - w_t`` per array, in ``sum_dtype`` (new, writable arrays).

    Raises ValueError when the reply's arrays are not the global model's (names, shapes).
    """
    if arrays.keys() != base.keys():
        missing, extra = sorted(base.keys() - arrays.keys()), sorted(arrays.keys() - base.keys())
        raise ValueError(f"reply arrays differ from the model's (missing {missing}, extra {extra})")
    out = {}
    for k, a in arrays.items():
        x, w = array_view(a), array_view(base[k])
        if x.shape != w.shape:
            raise ValueError(f"reply array '{k}' has shape {x.shape}, the model's is {w.shape}")
        out[k] = np.subtract(x, w, dtype=sum_dtype(x.dtype))
    return out


def leaf(update: Sums, weight: float) -> Sums:
    """One client's term of the weighted sum: ``weight * (w - w_t)``, in place."""
    for d in update.values():
        d *= d.dtype.type(weight)
    return update


def _merge(left: Sums | None, right: Sums | None) -> Sums | None:
    if left is None:
        return right
    if right is None:
        return left
    if left.keys() != right.keys():
        raise ValueError("replies carry different array keys")
    for k, v in left.items():
        if v.flags.writeable:  # a private accumulator: add in place
            v += right[k]
        else:  # e.g. received read-only from another process
            left[k] = v + right[k]
    return left


class TreeFold:
    """Streams terms at consecutive positions into whole-subtree sums (a binary counter).

    ``add`` must see consecutive positions (``None`` for a client that contributes
    nothing); ``blocks`` are then the maximal aligned subtrees covering those positions.
    """

    def __init__(self) -> None:
        self._stack: list[Block] = []
        self._next: int | None = None

    def add(self, pos: int, value: Sums | None) -> None:
        if self._next is not None and pos != self._next:
            raise ValueError(
                f"TreeFold positions must be consecutive: got {pos}, expected {self._next}"
            )
        self._next = pos + 1
        level, idx, val = 0, pos, value
        while idx % 2 == 1 and self._stack and self._stack[-1][:2] == (level, idx - 1):
            _, _, left = self._stack.pop()
            level, idx, val = level + 1, idx // 2, _merge(left, val)
        self._stack.append((level, idx, val))

    @property
    def blocks(self) -> list[Block]:
        return list(self._stack)


def combine(blocks: list[Block]) -> Sums | None:
    """Finish the tree from subtree sums that together cover positions 0..K-1 once."""
    level_of: dict[int, dict[int, Sums | None]] = {}
    for level, idx, val in blocks:
        if idx in level_of.setdefault(level, {}):
            raise ValueError(f"two partial sums for subtree ({level}, {idx})")
        level_of[level][idx] = val
    level = 0
    while level_of:
        nodes = level_of.pop(level, {})
        if not level_of and len(nodes) <= 1:  # the root
            return next(iter(nodes.values()), None)
        up = level_of.setdefault(level + 1, {})
        for idx in sorted({i // 2 for i in nodes}):
            left, right = nodes.get(2 * idx), nodes.get(2 * idx + 1)
            if idx in up:
                raise ValueError(f"two partial sums for subtree ({level + 1}, {idx})")
            # a missing sibling lies past the cohort's end: the node is its one child
            up[idx] = _merge(left, right)
        level += 1
    return None


def fold_metrics(
    parts: list[MetricRecord], weight_of: Callable[[float], float] | None = None
) -> MetricRecord:
    """Flower's ``aggregate_metricrecords`` arithmetic, with the summed ``num-examples``;
    ``weight_of`` maps a reply's num-examples to its weight (default: itself)."""
    n = [float(m[WEIGHT_KEY]) for m in parts]  # type: ignore[arg-type]
    weights = n if weight_of is None else [weight_of(x) for x in n]
    total = sum(weights)
    factors = [w / total for w in weights]
    agg_metrics: dict[str, Any] = {}
    for m, f in zip(parts, factors, strict=True):
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
    examples = sum(n)
    w_total = int(examples) if all(isinstance(m[WEIGHT_KEY], int) for m in parts) else examples
    agg_metrics[WEIGHT_KEY] = w_total
    return MetricRecord(agg_metrics)


def _mean(total: np.ndarray, weight: float) -> np.ndarray:
    w = total.dtype.type(weight)
    if total.flags.writeable:  # our own accumulator: divide in place
        return np.divide(total, w, out=total)
    return np.asarray(total / w)


def fold_weighted_mean(
    replies: list[Message | None],
    *,
    with_arrays: bool,
    reply_to: Message,
    blocks: list[Block] | None = None,
    updates: list[Sums | None] | None = None,
    finish: Callable[[Sums, float], Sums] | None = None,
    weight_of: Callable[[float], float] | None = None,
) -> Message | None:
    """One reply with the example-weighted mean of the successful replies (or None).

    ``replies`` is the cohort in position order (by client id), ``None`` or an error for
    a client that contributes nothing. The arrays are folded as updates ``w - w_t``
    against the model ``reply_to`` (an instruction of the phase) carries: from
    ``blocks`` (partial sums pre-folded by workers; the replies then carry metrics
    only), else from ``updates`` (each reply's update, already through the per-update
    transforms), else from the replies' own arrays. ``finish`` transforms the mean
    update (the aggregate transforms) before it is added to ``w_t``; ``weight_of`` maps
    a reply's num-examples to its weight (``Chains.weight``; default: itself). The
    result takes the dtypes of the model.
    """
    weigh = (lambda n: n) if weight_of is None else weight_of
    ok = [r is not None and not r.has_error() for r in replies]
    metrics = [records(r.content)[1] for r, good in zip(replies, ok, strict=True) if good]  # type: ignore[union-attr]
    if not metrics:
        return None
    content: dict[str, Any] = {"metrics": fold_metrics(metrics, weight_of)}
    if with_arrays:
        base = array_record(reply_to.content)
        if base is None:
            raise ValueError("a training instruction carries no ArrayRecord")
        weight = sum(weigh(float(m[WEIGHT_KEY])) for m in metrics)  # type: ignore[arg-type]
        if blocks is None:
            tree = TreeFold()
            for pos, (r, good) in enumerate(zip(replies, ok, strict=True)):
                term = None
                if good:
                    arrays, m = records(r.content)  # type: ignore[union-attr]
                    if updates is not None:
                        update = updates[pos]
                    elif arrays is None:
                        raise ValueError("a training reply carries no ArrayRecord")
                    else:
                        update = update_of(arrays, base)
                    w = weigh(float(m[WEIGHT_KEY]))  # type: ignore[arg-type]
                    term = None if update is None else leaf(update, w)
                tree.add(pos, term)
            blocks = tree.blocks
        total = combine(blocks)
        if total is None:
            return None
        mean = {k: _mean(v, weight) for k, v in total.items()}
        if finish is not None:
            mean = finish(mean, weight)
        content["arrays"] = ArrayRecord(
            {k: to_array(apply_update(base[k], d)) for k, d in mean.items()}
        )
    return Message(RecordDict(content), reply_to=reply_to)


def apply_update(base: Array, update: np.ndarray) -> np.ndarray:
    """``w_t + update`` (in the update's dtype), cast back to ``w_t``'s dtype."""
    w = array_view(base)
    if update.flags.writeable and update.dtype == np.result_type(update.dtype, w.dtype):
        total = np.add(update, w, out=update)
    else:
        total = update + w
    return total.astype(w.dtype, copy=False)
