"""Folding replies into one weighted mean: Flower's aggregate, in any split of the cohort."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, aggregate_metricrecords
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.engine.fold import (
    TreeFold,
    array_view,
    combine,
    fold_weighted_mean,
    leaf,
    sum_dtype,
    update_of,
)
from fedsim.engine.schedule import split_ranges

pytestmark = pytest.mark.usefixtures("task_identity")


_BASE_RNG = np.random.default_rng(42)
#: The global model w_t the instructions carry: replies are folded as updates against it.
BASE = {
    "w": _BASE_RNG.standard_normal((7, 5)).astype(np.float32),
    "b": _BASE_RNG.standard_normal(5).astype(np.float32),
}


def _instruction(i: int, base: dict[str, np.ndarray] | None = None) -> Message:
    base = BASE if base is None else base
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in base.items()})})
    ins = Message(content, dst_node_id=100 + i, message_type=MessageType.TRAIN)
    ins.metadata.__dict__["_message_id"] = f"m{i}"
    return ins


def _reply(i: int, w: np.ndarray, b: np.ndarray, n: int, loss: float) -> Message:
    ins = Message(RecordDict(), dst_node_id=100 + i, message_type=MessageType.TRAIN)
    ins.metadata.__dict__["_message_id"] = f"m{i}"
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(w), "b": Array(b)}),
            "metrics": MetricRecord({"num-examples": n, "train_loss": loss, "hist": [loss, 1.0]}),
        }
    )
    return Message(content, reply_to=ins)


def _cohort(k: int, seed: int = 0) -> list[Message]:
    rng = np.random.default_rng(seed)
    return [
        _reply(
            i,
            rng.standard_normal((7, 5)).astype(np.float32),
            rng.standard_normal(5).astype(np.float32),
            int(rng.integers(1, 100)),
            float(rng.random()),
        )
        for i in range(k)
    ]


def test_fold_equals_flowers_weighted_aggregate():
    replies = _cohort(9)
    folded = fold_weighted_mean(replies, with_arrays=True, reply_to=_instruction(0))
    contents = [r.content for r in replies]
    ref_arrays = aggregate_arrayrecords(contents, "num-examples")
    ref_metrics = aggregate_metricrecords(contents, "num-examples")
    for k in ("w", "b"):
        got = folded.content["arrays"][k].numpy()
        assert got.dtype == np.float32
        # float32 pairwise sums: equal to Flower's float32 arithmetic up to its rounding
        np.testing.assert_allclose(got, ref_arrays[k].numpy(), rtol=1e-5, atol=1e-6)
        exact = sum(
            r.content["arrays"][k].numpy().astype(np.float64) * r.content["metrics"]["num-examples"]
            for r in replies
        ) / sum(r.content["metrics"]["num-examples"] for r in replies)
        # and within a few float32 ulps of the exact mean (the updates' mean plus w_t)
        np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-6)
    got = folded.content["metrics"]
    # metrics: Flower's arithmetic, in the same order, bit for bit
    assert got["train_loss"] == ref_metrics["train_loss"] and got["hist"] == ref_metrics["hist"]
    assert got["num-examples"] == sum(r.content["metrics"]["num-examples"] for r in replies)
    # and FedAvg on the single folded reply returns the same arrays (its weight is 1.0)
    arrays, _ = FedAvg().aggregate_train(1, [folded])
    assert arrays["w"].numpy().tobytes() == folded.content["arrays"]["w"].numpy().tobytes()


def test_fold_keeps_float64_arrays_in_float64():
    rng = np.random.default_rng(3)
    replies = [
        _reply(
            i, rng.standard_normal((7, 5)), rng.standard_normal(5), int(rng.integers(1, 100)), 0.5
        )
        for i in range(6)
    ]
    base = {k: v.astype(np.float64) for k, v in BASE.items()}
    folded = fold_weighted_mean(replies, with_arrays=True, reply_to=_instruction(0, base))
    got = folded.content["arrays"]["w"].numpy()
    assert got.dtype == np.float64
    exact = sum(
        r.content["arrays"]["w"].numpy() * r.content["metrics"]["num-examples"] for r in replies
    ) / sum(r.content["metrics"]["num-examples"] for r in replies)
    np.testing.assert_allclose(got, exact, rtol=1e-13, atol=1e-15)  # float64 precision
    assert sum_dtype(np.dtype(np.float16)) == np.float32
    assert sum_dtype(np.dtype(np.int64)) == np.float64


def _terms(replies: list[Message | None]) -> list:
    out = []
    for r in replies:
        if r is None:
            out.append(None)
        else:
            c = r.content
            update = update_of(c["arrays"], _instruction(0).content["arrays"])
            out.append(leaf(update, float(c["metrics"]["num-examples"])))
    return out


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 40),
    workers=st.integers(1, 9),
    missing=st.sets(st.integers(0, 39)),
    seed=st.integers(0, 3),
)
def test_prefolded_ranges_give_the_same_bits_for_any_split(k, workers, missing, seed):
    replies: list[Message | None] = list(_cohort(k, seed))
    for i in missing:
        if i < k:
            replies[i] = None
    if all(r is None for r in replies):
        return
    whole = fold_weighted_mean(replies, with_arrays=True, reply_to=_instruction(0))
    rng = np.random.default_rng(seed)
    costs = rng.integers(1, 5, size=k).tolist()
    blocks = []
    terms = _terms(replies)
    for a, b in split_ranges(costs, workers):
        tree = TreeFold()
        for pos in range(a, b):
            tree.add(pos, terms[pos])
        blocks += tree.blocks
    # workers send metrics only
    stripped = [
        None if r is None else Message(RecordDict({"metrics": r.content["metrics"]}), reply_to=r)
        for r in replies
    ]
    split = fold_weighted_mean(stripped, with_arrays=True, reply_to=_instruction(0), blocks=blocks)
    for key in ("w", "b"):
        assert (
            split.content["arrays"][key].numpy().tobytes()
            == whole.content["arrays"][key].numpy().tobytes()
        )
    assert split.content["metrics"]["train_loss"] == whole.content["metrics"]["train_loss"]


def test_tree_fold_keeps_only_log_many_partial_sums():
    tree = TreeFold()
    one = {"x": np.ones(3)}
    for pos in range(1000):
        tree.add(pos, {"x": one["x"].copy()})
        assert len(tree.blocks) <= 10  # popcount(pos + 1) <= log2(1000)
    assert combine(tree.blocks)["x"].tolist() == [1000.0] * 3
    with pytest.raises(ValueError, match="consecutive"):
        tree.add(1001, None)


def test_split_ranges_balances_by_cost_and_covers_everything():
    assert split_ranges([1] * 10, 2) == [(0, 5), (5, 10)]
    assert split_ranges([1] * 3, 4) == [(0, 1), (1, 2), (2, 2), (2, 3)]  # one worker idle
    r = split_ranges([5, 1, 1, 1, 1, 1], 2)
    assert r == [(0, 1), (1, 6)]
    for n in range(1, 6):
        rs = split_ranges([1, 2, 3, 4, 5, 6, 7], n)
        assert rs[0][0] == 0 and rs[-1][1] == 7 and len(rs) == n
        assert all(rs[i][1] == rs[i + 1][0] for i in range(n - 1))


def test_errors_are_skipped_and_nothing_left_gives_none():
    r = _reply(0, np.ones((2, 2), np.float32), np.ones(2, np.float32), 3, 0.5)
    err = Message(__import__("flwr.app", fromlist=["Error"]).Error(2, "x"), reply_to=r)
    assert fold_weighted_mean([err], with_arrays=True, reply_to=r) is None


def test_array_view_reads_npy_bytes_without_copying():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    arr = Array(a)
    v = array_view(arr)
    assert np.array_equal(v, a) and v.dtype == a.dtype and not v.flags.writeable
    f = Array(np.asfortranarray(a))
    assert np.array_equal(array_view(f), a)


def test_float32_tree_error_stays_within_a_few_ulps_at_1000_clients():
    # The README quotes these numbers: the pairwise tree's error grows with log2(K).
    rng = np.random.default_rng(0)
    k, d = 1000, 20_000
    xs = rng.standard_normal((k, d)).astype(np.float32) + np.float32(0.3)
    ns = rng.integers(1, 600, k)
    tree = TreeFold()
    for i in range(k):
        tree.add(i, {"a": xs[i] * np.float32(ns[i])})
    got = combine(tree.blocks)["a"] / np.float32(ns.sum())
    exact = (xs.astype(np.float64) * ns[:, None]).sum(0) / ns.sum()
    seq = np.zeros(d, np.float32)
    for i in range(k):
        seq += xs[i] * np.float32(ns[i] / ns.sum())
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    tree_ulps = (np.abs(got - exact) / ulp).max()
    seq_ulps = (np.abs(seq - exact) / ulp).max()
    assert tree_ulps <= 3 and seq_ulps >= 20, (tree_ulps, seq_ulps)


def test_the_fold_averages_updates_and_adds_them_to_the_model():
    # The leaves are n_i * (x_i - w_t): the result is w_t + mean(x_i - w_t), computed so.
    replies = _cohort(5, seed=2)
    folded = fold_weighted_mean(replies, with_arrays=True, reply_to=_instruction(0))
    ns = [r.content["metrics"]["num-examples"] for r in replies]
    for k in ("w", "b"):
        deltas = [r.content["arrays"][k].numpy() - BASE[k] for r in replies]
        tree = TreeFold()
        for i, (d, n) in enumerate(zip(deltas, ns, strict=True)):
            tree.add(i, {k: d * np.float32(n)})
        mean = combine(tree.blocks)[k] / np.float32(sum(ns))
        expected = (BASE[k] + mean).astype(np.float32)
        assert folded.content["arrays"][k].numpy().tobytes() == expected.tobytes()


def test_update_of_refuses_arrays_that_are_not_the_models():
    base = _instruction(0).content["arrays"]
    wrong_shape = ArrayRecord({"w": Array(np.zeros((5, 7), np.float32)), "b": base["b"]})
    with pytest.raises(ValueError, match="'w' has shape"):
        update_of(wrong_shape, base)
    with pytest.raises(ValueError, match=r"missing \['b'\], extra \['c'\]"):
        update_of(ArrayRecord({"w": base["w"], "c": base["b"]}), base)
