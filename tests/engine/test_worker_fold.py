"""A worker's pre-fold gives the same sums and replies however many trained replies it
lets wait before folding them (``fedsim.engine.worker.FOLD_AFTER_BYTES``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

import fedsim.engine.worker as worker_module
from clients.app import _env
from fedsim.client_params import DROPOUT_KEY
from fedsim.engine.worker import ClientWorker
from fedsim.scenario import load_scenario

CIDS = [3, 8, 11, 12, 20, 31, 40]  # a contiguous range of cohort positions 5..11
DROPPED = 12  # its ClientApp raises: an error reply in the middle of the batch


@pytest.fixture(scope="module")
def worker():
    scn = load_scenario(
        Path(__file__).parents[2] / "scenarios" / "bench_tiny.toml",
        [
            "data.num_clients=50",
            "data.samples_per_client=20",
            "model.name=mlp",
            "strategy.clients_per_round=10",
        ],
    )
    w = ClientWorker(scn.model_dump_json(), 1)
    env = _env(scn.model_dump_json())
    return w, ArrayRecord({k: v.clone() for k, v in env.model.state_dict().items()})


def _batch(record: ArrayRecord) -> list[tuple[int, Message]]:
    batch = []
    for cid in CIDS:
        config = ConfigRecord({"server-round": 2, **({DROPOUT_KEY: 1} if cid == DROPPED else {})})
        msg = Message(
            RecordDict({"arrays": record, "config": config}),
            dst_node_id=cid,
            message_type=MessageType.TRAIN,
        )
        msg.metadata.__dict__["_message_id"] = f"m{cid}"
        batch.append((cid, msg))
    return batch


def _run(worker, monkeypatch, after_bytes: int):
    w, record = worker
    calls = []
    fold = w._fold_waiting
    with monkeypatch.context() as m:
        m.setattr(worker_module, "FOLD_AFTER_BYTES", after_bytes)
        m.setattr(
            w, "_fold_waiting", lambda waiting, *a: (calls.append(len(waiting)), fold(waiting, *a))
        )
        out = w.run(0, 50, _batch(record), fold_from=5)
    return out, calls


def _reply_view(reply: Message):
    if reply.has_error():
        return ("error", reply.error.code, reply.error.reason)
    assert not any(isinstance(r, ArrayRecord) for r in reply.content.values())
    return ("ok", reply.metadata.reply_to_message_id, dict(reply.content["metrics"]))


def test_waiting_replies_fold_to_the_same_sums(worker, monkeypatch, task_identity):
    model_bytes = sum(len(a.data) for a in worker[1].values())  # (as instructions carry it)
    at_once, calls_one = _run(worker, monkeypatch, 1)  # each reply folded as it comes
    in_twos, calls_two = _run(worker, monkeypatch, 2 * model_bytes)
    all_wait, calls_all = _run(worker, monkeypatch, 1 << 40)
    # The replies wait as asked: folded one by one, two at a time, all at the end.
    assert calls_one[:-1] == [1] * len(CIDS) and calls_one[-1] == 0
    assert calls_two == [2, 2, 2, 1]
    assert calls_all == [len(CIDS)]
    for out in (in_twos, all_wait):
        assert [_reply_view(r) for r in out.replies] == [_reply_view(r) for r in at_once.replies]
        assert [(lvl, i) for lvl, i, _ in out.blocks] == [(lvl, i) for lvl, i, _ in at_once.blocks]
        for (_, _, got), (_, _, want) in zip(out.blocks, at_once.blocks, strict=True):
            assert (got is None) == (want is None)
            if got is not None:
                assert got.keys() == want.keys()
                for k in got:
                    assert got[k].tobytes() == want[k].tobytes()  # bit for bit
    # The dropped client is an error in its own place; the others folded.
    views = [_reply_view(r) for r in at_once.replies]
    assert [v[0] for v in views] == ["error" if c == DROPPED else "ok" for c in CIDS]
    assert any(
        s is not None and np.abs(next(iter(s.values()))).sum() > 0 for *_, s in at_once.blocks
    )
