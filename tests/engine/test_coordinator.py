"""Coordinator policies without Ray: seeded sampling, reply order, failures."""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsim.engine.coordinator import AllClientsFailed, ClientDirectory, Coordinator
from fedsim.engine.fold import TreeFold
from fedsim.engine.grid import NODE_ID_OFFSET, RayGrid
from fedsim.engine.messaging import PhasedGrid, SubsetGrid
from fedsim.engine.validation import ReplyLimits
from fedsim.engine.worker import ClientWorker
from fedsim.transforms import Chains


class LocalPool:
    """Runs batches in-process: replies carry ``values[cid]`` (default: the id) as weights."""

    shares_work = False  # fixed batches only

    def __init__(
        self,
        fail: set[int] | None = None,
        *,
        reverse: bool = True,
        values=None,
        size: int = 2,
        chains=None,
    ):
        self.size = size
        self.fail = fail or set()
        self.reverse = reverse
        self.values = values or {}
        self.calls: list[list[int]] = []
        self.chains = chains or Chains()

    def submit(self, run_id, num_clients, batches, fold_from=None):
        return (run_id, num_clients, batches, fold_from)

    def collect(self, pending, timeout=None):  # runs a submitted phase now
        run_id, num_clients, batches, fold_from = pending
        return self.run(run_id, num_clients, batches, fold_from=fold_from)

    def run(self, run_id, num_clients, batches, timeout=None, fold_from=None):
        out, blocks = [], []
        order = reversed if self.reverse else iter
        for i, batch in order(list(enumerate(batches))):  # replies arrive scrambled
            self.calls.append([cid for cid, _ in batch])
            if fold_from is not None:  # the workers' pre-fold, as ClientWorker.run does it
                tree = TreeFold()
                for pos, (cid, msg) in enumerate(batch, start=fold_from[i]):
                    reply, term = ClientWorker.fold(
                        self._reply(cid, msg), msg, self.chains, cid, ReplyLimits()
                    )
                    tree.add(pos, term)
                    out.append(reply)
                blocks += tree.blocks
                continue
            for cid, msg in order(batch):
                out.append(self._reply(cid, msg))
        return out, blocks

    def _reply(self, cid, msg):
        if msg.metadata.message_type == MessageType.QUERY:  # node discovery
            info = MetricRecord({"partition-id": cid})
            return Message(RecordDict({"info": info}), reply_to=msg)
        if cid in self.fail:
            return Message(Error(2, f"client {cid} broke"), reply_to=msg)
        content = RecordDict(
            {
                "arrays": ArrayRecord(
                    {"w": Array(np.array([self.values.get(cid, cid)], np.float32))}
                ),
                "metrics": MetricRecord(
                    {"num-examples": 1 if self.values else cid + 1, "train_loss": 1.0}
                ),
            }
        )
        return Message(content, reply_to=msg)


def _coordinator(num_clients=10, cohort=4, seed=0, rounds=1, eval_cohort=0, fold=False):
    return Coordinator(
        fold_train=fold,
        strategy=FedAvg(fraction_train=1.0, min_train_nodes=0, min_available_nodes=0),
        initial_arrays=ArrayRecord({"w": Array(np.zeros(1, np.float32))}),
        num_clients=num_clients,
        rounds=rounds,
        train_cohort=cohort,
        eval_cohort=eval_cohort,
        seed=seed,
    )


def test_sampling_is_seeded_sorted_distinct_and_leaves_global_random_alone():
    state = random.getstate()
    c = _coordinator(num_clients=100, cohort=10)
    a = c.sample(3, "train", 10)
    assert a == c.sample(3, "train", 10) == sorted(set(a)) and len(a) == 10
    assert a != c.sample(4, "train", 10)
    assert a != _coordinator(num_clients=100, cohort=10, seed=1).sample(3, "train", 10)
    assert c.sample(3, "train", 100) == list(range(100))
    assert random.getstate() == state


def test_round_aggregates_the_sampled_clients_weighted_by_examples():
    pool = LocalPool()
    c = _coordinator(num_clients=10, cohort=4, rounds=1)
    res = c.run(RayGrid(pool, num_clients=10))
    cids = c.sample(1, "train", 4)
    expected = sum(cid * (cid + 1) for cid in cids) / sum(cid + 1 for cid in cids)
    assert res.arrays["w"].numpy()[0] == pytest.approx(expected, rel=1e-6)
    rec = res.rounds[0]
    assert rec["clients_selected"] == 4 and rec["clients_replied"] == 4
    assert rec["clients_failed"] == 0 and rec["train_loss"] == pytest.approx(1.0)
    assert sorted(c for call in pool.calls for c in call) == cids


def test_failed_clients_are_counted_and_excluded():
    pool = LocalPool(fail={1})
    c = _coordinator(num_clients=4, cohort=4)
    res = c.run(RayGrid(pool, num_clients=4))
    rec = res.rounds[0]
    assert rec["clients_failed"] == 1 and rec["clients_replied"] == 3
    expected = (0 * 1 + 2 * 3 + 3 * 4) / (1 + 3 + 4)
    assert res.arrays["w"].numpy()[0] == pytest.approx(expected, rel=1e-6)


def test_all_clients_failing_stops_the_run_with_the_reason():
    with pytest.raises(AllClientsFailed, match="client 0 broke"):
        _coordinator(num_clients=2, cohort=2).run(RayGrid(LocalPool(fail={0, 1}), num_clients=2))


def test_reply_order_does_not_change_the_result():
    # float32 sums of these values depend on the order: 1e8 swallows the small terms.
    values = {0: 1e8, 1: 1.0, 2: -1e8, 3: 1.0}
    results = [
        _coordinator(num_clients=4, cohort=4)
        .run(RayGrid(LocalPool(reverse=rev, values=values), num_clients=4))
        .arrays["w"]
        .numpy()
        for rev in (False, True)
    ]
    assert results[0].tobytes() == results[1].tobytes()


def test_directory_maps_both_ways():
    d = RayGrid(LocalPool(), num_clients=3).client_directory()
    assert d.node_of(2) == NODE_ID_OFFSET + 2 and d.client_of(NODE_ID_OFFSET + 2) == 2
    t = ClientDirectory({0: 17, 1: 5})
    assert t.node_of(1) == 5 and t.client_of(17) == 0


class PlainGrid(SubsetGrid):
    """fedsim's grid seen as a plain Flower ``Grid`` (not a ``PhasedGrid``): the
    coordinator discovers the nodes and folds every reply itself, as it does under
    Flower's runtime or with real SuperNodes."""

    def __init__(self, pool, num_clients):
        inner = RayGrid(pool, num_clients=num_clients)
        super().__init__(inner, list(inner.get_node_ids()))


def test_folded_mean_is_bit_identical_for_any_worker_count_and_without_prefold():
    rng = np.random.default_rng(3)
    values = {cid: float(v) for cid, v in enumerate(rng.standard_normal(40) * 1e4)}
    runs = []
    for size in (1, 2, 3, 7):
        pool = LocalPool(values=values, size=size, fail={5, 17})
        runs.append(_coordinator(40, 23, rounds=2, fold=True).run(RayGrid(pool, num_clients=40)))
    plain = LocalPool(values=values, fail={5, 17})
    runs.append(_coordinator(40, 23, rounds=2, fold=True).run(PlainGrid(plain, num_clients=40)))
    assert not isinstance(PlainGrid(plain, num_clients=40), PhasedGrid)
    got = {r.arrays["w"].numpy().tobytes() for r in runs}
    assert len(got) == 1
    assert [r.rounds[0]["clients_failed"] for r in runs] == [
        runs[0].rounds[0]["clients_failed"]
    ] * 5
    # and the fold is the weighted mean FedAvg computes without it
    ref = _coordinator(40, 23, rounds=2).run(
        RayGrid(LocalPool(values=values, fail={5, 17}), num_clients=40)
    )
    np.testing.assert_allclose(runs[0].arrays["w"].numpy(), ref.arrays["w"].numpy(), rtol=1e-6)


class CallOrder(FedAvg):
    """FedAvg that logs its calls (and can fail in configure_train)."""

    def __init__(self, log, fail_round=None):
        super().__init__(fraction_train=1.0, min_train_nodes=0, min_available_nodes=0)
        self.log, self.fail_round = log, fail_round

    def configure_train(self, server_round, *args, **kwargs):
        self.log.append(("configure_train", server_round))
        if server_round == self.fail_round:
            raise RuntimeError(f"configure_train broke in round {server_round}")
        return super().configure_train(server_round, *args, **kwargs)

    def aggregate_train(self, server_round, replies):
        self.log.append(("aggregate_train", server_round))
        return super().aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, *args, **kwargs):
        self.log.append(("configure_evaluate", server_round))
        return super().configure_evaluate(server_round, *args, **kwargs)

    def aggregate_evaluate(self, server_round, replies):
        self.log.append(("aggregate_evaluate", server_round))
        return super().aggregate_evaluate(server_round, replies)


def _w_as_loss(rnd, arrays):
    return MetricRecord({"eval_loss": float(arrays["w"].numpy()[0])})


def _lookahead_run(lookahead, log, fail_round=None, seen=None, pool=None, evaluate_fn=_w_as_loss):
    c = Coordinator(
        fold_train=True,
        strategy=CallOrder(log, fail_round),
        initial_arrays=ArrayRecord({"w": Array(np.zeros(1, np.float32))}),
        num_clients=12,
        rounds=3,
        train_cohort=5,
        eval_cohort=3,
        seed=4,
        evaluate_fn=evaluate_fn,
        on_round=None if seen is None else seen.append,
        lookahead=lookahead,
    )
    return c.run(RayGrid(pool or LocalPool(), num_clients=12))


def test_lookahead_queues_training_ahead_of_evaluation_and_changes_no_result():
    logs: dict[bool, list] = {True: [], False: []}
    runs = {la: _lookahead_run(la, logs[la]) for la in (True, False)}
    strip = {
        la: [{k: v for k, v in r.items() if k != "round_wall_s"} for r in res.rounds]
        for la, res in runs.items()
    }
    assert strip[True] == strip[False]
    assert [r["round"] for r in runs[True].rounds] == [1, 2, 3]
    assert strip[True][2]["eval_loss"] is not None
    assert runs[True].arrays["w"].numpy() == runs[False].arrays["w"].numpy()
    ct, at, ce, ae = (
        "configure_train",
        "aggregate_train",
        "configure_evaluate",
        "aggregate_evaluate",
    )
    assert logs[False] == [(ct, 1), (at, 1), (ce, 1), (ae, 1), (ct, 2), (at, 2), (ce, 2), (ae, 2),
                           (ct, 3), (at, 3), (ce, 3), (ae, 3)]  # fmt: skip
    # Round r + 1's training is sent before round r's evaluation, and round r's
    # evaluation is aggregated after round r + 1's training.
    assert logs[True] == [(ct, 1), (at, 1), (ct, 2), (ce, 1), (at, 2), (ct, 3), (ce, 2),
                          (ae, 1), (at, 3), (ce, 3), (ae, 2), (ae, 3)]  # fmt: skip
    # Every round records its wall time (the one key the comparison above leaves out).
    for res in runs.values():
        assert all(
            isinstance(r["round_wall_s"], float) and r["round_wall_s"] >= 0 for r in res.rounds
        )


def test_an_error_starting_the_next_round_early_surfaces_after_this_round_ends():
    seen: list = []
    with pytest.raises(RuntimeError, match="broke in round 2"):
        _lookahead_run(True, [], fail_round=2, seen=seen)
    assert [r["round"] for r in seen] == [1]  # round 1 was recorded before the error


class FailsInRound(LocalPool):
    """Every client fails in one round's training."""

    def __init__(self, bad_round):
        super().__init__()
        self.bad_round = bad_round

    def _reply(self, cid, msg):
        config = msg.content.config_records.get("config")
        if config is not None and config.get("server-round") == self.bad_round:
            return Message(Error(2, f"client {cid} broke"), reply_to=msg)
        return super()._reply(cid, msg)


def test_a_round_that_fails_in_training_leaves_the_round_before_recorded():
    for lookahead in (True, False):
        seen: list = []
        with pytest.raises(AllClientsFailed, match="round 2"):
            _lookahead_run(lookahead, [], seen=seen, pool=FailsInRound(2))
        assert [r["round"] for r in seen] == [1]


def test_a_round_whose_closing_fails_is_not_closed_twice():
    # The centralized evaluation of round 2 raises: that is the error, and round 2 is not
    # evaluated again on the way out (round 3, trained ahead, is closed once).
    for lookahead in (True, False):
        calls: list[int] = []

        def evaluate(rnd, arrays, calls=calls):
            calls.append(rnd)
            if rnd == 2:
                raise RuntimeError("central evaluation broke")
            return MetricRecord({"eval_loss": 0.0})

        with pytest.raises(RuntimeError, match="central evaluation broke"):
            _lookahead_run(lookahead, [], evaluate_fn=evaluate)
        assert calls.count(2) == 1, (lookahead, calls)


class Malformed(LocalPool):
    """The clients in ``bad`` reply an array the model does not have."""

    def __init__(self, bad):
        super().__init__()
        self.bad = bad

    def _reply(self, cid, msg):
        reply = super()._reply(cid, msg)
        if cid in self.bad and not reply.has_error() and "arrays" in reply.content:
            reply.content["arrays"] = ArrayRecord({"v": Array(np.zeros(1, np.float32))})
        return reply


@pytest.mark.parametrize("grid", [RayGrid, PlainGrid])
def test_malformed_replies_are_rejected_the_same_way_on_every_grid(grid):
    # Folded in a worker (RayGrid) or at the coordinator (PlainGrid, as under Flower's
    # runtime): a reply whose arrays are not the model's leaves out its client only.
    c = _coordinator(num_clients=4, cohort=4, fold=True)
    res = c.run(grid(Malformed({1, 3}), num_clients=4))
    rec = res.rounds[0]
    assert rec["clients_rejected"] == 2 and rec["clients_aggregated"] == 2
    assert res.arrays["w"].numpy().tolist() == [1.5]  # clients 0 and 2, weights 1 and 3
    # When every reply is rejected the round is skipped (model unchanged), not an error.
    c = _coordinator(num_clients=4, cohort=4, fold=True)
    res = c.run(grid(Malformed({0, 1, 2, 3}), num_clients=4))
    assert res.rounds[0]["round_skipped"] and res.rounds[0]["clients_rejected"] == 4
    assert res.arrays["w"].numpy().tolist() == [0.0]
