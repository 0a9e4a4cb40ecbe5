"""The Ray worker pool: batches of real ClientApp calls, the global model held across phases."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import ray
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsim.engine import claims, transport
from fedsim.engine import pool as pool_mod
from fedsim.engine.fold import combine
from fedsim.engine.pool import WorkerPool
from fedsim.models import build_model
from fedsim.scenario import load_scenario

NUM_CLIENTS = 8


@pytest.fixture(scope="module")
def scenario():
    return load_scenario(None, [f"data.num_clients={NUM_CLIENTS}", "strategy.clients_per_round=4"])


def _model(scn, seed: int) -> ArrayRecord:
    from fedsim.data import load_federation

    fed = load_federation(scn.data, seed=scn.run.seed)
    m = build_model(scn.model, input_shape=fed.input_shape, num_classes=fed.num_classes, seed=seed)
    return ArrayRecord(m.state_dict())


def _batches(record: ArrayRecord, kind: str, rnd: int, tag: str):
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    content = RecordDict({"arrays": record, "config": ConfigRecord({"server-round": rnd})})
    out = []
    for cids in ((0, 1, 2, 3), (4, 5, 6, 7)):
        batch = []
        for cid in cids:
            msg = Message(content, dst_node_id=cid + 1, message_type=kind)
            msg.metadata.__dict__["_message_id"] = f"{tag}-{cid}"
            batch.append((cid, msg))
        out.append(batch)
    return out


def _kill(actor) -> None:
    """ray.kill, and wait until the actor is gone (the kill is asynchronous: a call sent
    right after it may still run)."""
    ray.kill(actor)
    for _ in range(200):
        try:
            ray.get(actor.node.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError("the killed actor is still running")


def _train(pool, record, rnd, tag):
    replies, blocks = pool.run(
        1, NUM_CLIENTS, _batches(record, MessageType.TRAIN, rnd, tag), fold_from=[0, 4]
    )
    assert not any(r.has_error() for r in replies)
    return {k: v.copy() for k, v in combine(blocks).items()}


def _evaluate(pool, record, rnd, tag):
    replies, _ = pool.run(1, NUM_CLIENTS, _batches(record, MessageType.EVALUATE, rnd, tag))
    assert not any(r.has_error() for r in replies)
    return sorted(
        (r.metadata.reply_to_message_id, r.content["metrics"]["eval_loss"]) for r in replies
    )


def test_a_batch_refers_to_the_held_record_instead_of_carrying_it(scenario):
    record = _model(scenario, 1)
    batch = _batches(record, MessageType.TRAIN, 1, "t")[0]
    packed = transport.pack_batch(batch, record, 7)
    full = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
    model_bytes = sum(len(a.data) for a in record.values())
    assert len(full) > model_bytes > 20 * len(packed)
    other = _model(scenario, 2)
    transport._HELD.clear()
    transport._HELD[7] = other
    got = pickle.loads(packed)
    assert all(m.content["arrays"] is other for _, m in got)  # resolved to the held object
    transport._HELD.clear()
    with pytest.raises(RuntimeError, match="does not hold record 7"):
        pickle.loads(packed)


def test_a_record_changed_in_place_gets_a_new_token(scenario):
    record = _model(scenario, 1)
    pool = WorkerPool.__new__(WorkerPool)
    pool._shared = None
    assert pool._token(record) == pool._token(record) == 0
    key = next(iter(record))
    record[key] = _model(scenario, 2)[key]  # a strategy replacing an entry in place
    assert pool._token(record) == 1
    assert pool._token(_model(scenario, 1)) == 2  # an equal but new record is new too


def test_held_records_give_the_same_results_as_sending_every_time(scenario, ray_cluster):
    spec = scenario.model_dump_json()
    a, b = _model(scenario, 1), _model(scenario, 2)
    pool = WorkerPool(spec, num_workers=2, cpus=1, gpus=0, torch_threads=1)
    try:
        pool.warm()
        sums_a = _train(pool, a, 1, "r1")
        assert pool._held == [0, 0]
        ev_a = _evaluate(pool, a, 1, "e1")  # same record: not sent again
        assert pool._held == [0, 0]
        sums_b = _train(pool, b, 2, "r2")  # a new record gets a new token
        assert pool._held == [1, 1]
        _kill(pool.actors[0])  # a lost worker is replaced and sent the record again
        replies, _ = pool.run(1, NUM_CLIENTS, _batches(b, MessageType.EVALUATE, 2, "x"))
        assert sum(r.has_error() for r in replies) == 4 and pool._held == [None, 1]
        ev_b = _evaluate(pool, b, 2, "e2")
        assert pool._held == [1, 1]
    finally:
        pool.shutdown()
    fresh = WorkerPool(spec, num_workers=2, cpus=1, gpus=0, torch_threads=1)
    try:
        fresh.warm()
        assert _evaluate(fresh, a, 1, "e1") == ev_a
        assert _evaluate(fresh, b, 2, "e2") == ev_b
        for got, ref in ((sums_a, _train(fresh, a, 1, "r1")), (sums_b, _train(fresh, b, 2, "r2"))):
            assert got.keys() == ref.keys()
            assert all(np.array_equal(got[k], ref[k]) for k in got)
    finally:
        fresh.shutdown()


def test_a_phase_queued_behind_another_runs_next_also_on_a_replaced_worker(scenario, ray_cluster):
    spec = scenario.model_dump_json()
    b = _model(scenario, 2)
    ref = WorkerPool(spec, num_workers=2, cpus=1, gpus=0, torch_threads=1)
    try:
        ref.warm()
        ev_ref, sums_ref = _evaluate(ref, b, 2, "e"), _train(ref, b, 3, "t")
    finally:
        ref.shutdown()

    def both(pool):  # evaluation, with the next round's training queued behind it
        ev = pool.submit(1, NUM_CLIENTS, _batches(b, MessageType.EVALUATE, 2, "e"))
        tr = pool.submit(1, NUM_CLIENTS, _batches(b, MessageType.TRAIN, 3, "t"), fold_from=[0, 4])
        return pool.collect(ev), pool.collect(tr)

    pool = WorkerPool(spec, num_workers=2, cpus=1, gpus=0, torch_threads=1)
    try:
        pool.warm()
        (ev, _), (tr, blocks) = both(pool)
        assert (
            sorted((r.metadata.reply_to_message_id, r.content["metrics"]["eval_loss"]) for r in ev)
            == ev_ref
        )
        assert not any(r.has_error() for r in tr)
        sums = combine(blocks)
        assert all(np.array_equal(sums[k], sums_ref[k]) for k in sums_ref)
        # A worker lost with both phases queued on it: its evaluation clients fail, and its
        # training call goes to the replacement, which is sent the model first.
        _kill(pool.actors[0])
        (ev, _), (tr, blocks) = both(pool)
        assert sum(r.has_error() for r in ev) == 4
        assert not any(r.has_error() for r in tr) and pool._held == [0, 0]
        sums = combine(blocks)
        assert all(np.array_equal(sums[k], sums_ref[k]) for k in sums_ref)
    finally:
        pool.shutdown()


def _items(record: ArrayRecord, kind: str, rnd: int, tag: str):
    return [item for batch in _batches(record, kind, rnd, tag) for item in batch]


def test_a_shared_phase_runs_each_client_once_with_the_replies_of_fixed_batches(
    scenario, ray_cluster
):
    spec = scenario.model_dump_json()
    b = _model(scenario, 2)
    pool = WorkerPool(spec, num_workers=2, cpus=1, gpus=0, torch_threads=1)
    try:
        pool.warm()
        assert pool.shares_work  # one node: the workers share a counter
        fixed = _evaluate(pool, b, 2, "e")
        pending = pool.submit_shared(1, NUM_CLIENTS, _items(b, MessageType.EVALUATE, 2, "e"))
        counter = pending.claims
        replies, _ = pool.collect(pending)
        ids = [r.metadata.reply_to_message_id for r in replies]
        assert sorted(ids) == sorted(f"e-{c}" for c in range(NUM_CLIENTS))  # each once
        losses = [r.content["metrics"]["eval_loss"] for r in replies]
        assert sorted(zip(ids, losses, strict=True)) == fixed
        assert not os.path.exists(counter)  # removed once the phase is collected
        shm = pool._shm
    finally:
        pool.shutdown()
    assert not os.path.exists(shm)


def test_a_shared_phase_fails_only_the_clients_a_lost_worker_had_taken(
    scenario, ray_cluster, monkeypatch
):
    spec = scenario.model_dump_json()
    b = _model(scenario, 2)
    pool = WorkerPool(spec, num_workers=2, cpus=1, gpus=0, torch_threads=1)
    try:
        pool.warm()
        _kill(pool.actors[0])
        # As if the lost worker had taken the first three clients before it died.
        create = pool_mod.new_counter
        monkeypatch.setattr(pool_mod, "new_counter", lambda path: create(path, 3))
        items = _items(b, MessageType.EVALUATE, 2, "e")
        replies, _ = pool.collect(pool.submit_shared(1, NUM_CLIENTS, items))
        bad = sorted(r.metadata.reply_to_message_id for r in replies if r.has_error())
        good = sorted(r.metadata.reply_to_message_id for r in replies if not r.has_error())
        assert bad == ["e-0", "e-1", "e-2"]  # equal costs: the order is by client id
        assert good == [f"e-{c}" for c in range(3, NUM_CLIENTS)]
        assert all("worker failed" in r.error.reason for r in replies if r.has_error())
        # the lost worker was replaced: the next shared phase runs on both again
        monkeypatch.undo()
        replies, _ = pool.collect(pool.submit_shared(1, NUM_CLIENTS, items))
        assert not any(r.has_error() for r in replies) and len(replies) == NUM_CLIENTS
    finally:
        pool.shutdown()


def test_the_claim_counter_gives_each_number_once_across_processes(tmp_path):
    path = str(tmp_path / "counter")
    claims.new_counter(path)
    code = (
        "import sys\n"
        "from fedsim.engine.claims import ClaimCounter\n"
        "c = ClaimCounter(sys.argv[1])\n"
        "print(' '.join(str(c.take()) for _ in range(20000)))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    got = [[int(x) for x in p.communicate(timeout=120)[0].split()] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(x for part in got for x in part) == list(range(60000))
    assert all(part == sorted(part) for part in got)
