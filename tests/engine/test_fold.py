"""Folding replies into one weighted mean gives exactly Flower's aggregate."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, aggregate_metricrecords
from flwr.supercore.task_identity import TaskIdentity

from fedsim.engine.fold import array_view, fold_weighted_mean


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


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


def test_fold_equals_flowers_weighted_aggregate_bit_for_bit():
    rng = np.random.default_rng(0)
    replies = [
        _reply(
            i,
            rng.standard_normal((7, 5)).astype(np.float32),
            rng.standard_normal(5).astype(np.float32),
            int(rng.integers(1, 100)),
            float(rng.random()),
        )
        for i in range(9)
    ]
    folded = fold_weighted_mean(replies, with_arrays=True, reply_to=replies[0])
    contents = [r.content for r in replies]
    ref_arrays = aggregate_arrayrecords(contents, "num-examples")
    ref_metrics = aggregate_metricrecords(contents, "num-examples")
    for k in ("w", "b"):
        assert folded.content["arrays"][k].numpy().tobytes() == ref_arrays[k].numpy().tobytes()
    got = folded.content["metrics"]
    assert got["train_loss"] == ref_metrics["train_loss"] and got["hist"] == ref_metrics["hist"]
    assert got["num-examples"] == sum(r.content["metrics"]["num-examples"] for r in replies)
    # and FedAvg on the single folded reply returns the same arrays (its weight is 1.0)
    arrays, _ = FedAvg().aggregate_train(1, [folded])
    assert arrays["w"].numpy().tobytes() == ref_arrays["w"].numpy().tobytes()


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
