"""The coordinator: fedsim's round loop wrapped around any Flower strategy.

It owns the policies a strategy should not have to know about: which clients take part
(sampled with fedsim's own seeded generator, not the global ``random`` that Flower's
``sample_nodes`` reads), the order replies are aggregated in (by client id, so worker
timing never changes a result), failed replies, and the per-round record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.engine.fold import Block, fold_weighted_mean, num_examples
from fedsim.engine.messaging import (
    ClientDirectory,
    SubsetGrid,
    exchange,
    pinned_global_random,
)
from fedsim.engine.policy import (
    AGGREGATED,
    DROPPED,
    LATE,
    REPLIED,
    RoundPlan,
    plan_round,
    select_count,
)
from fedsim.rng import int_seed, np_rng
from fedsim.world.config import CoordinatorSection

if TYPE_CHECKING:
    from fedsim.world import World

log = logging.getLogger("fedsim")

RoundHook = Callable[[dict[str, Any]], None]
ParticipationHook = Callable[[int, "np.ndarray | None", dict[int, str]], None]
MAX_STEPS_KEY = "max-steps"  # config key: a straggler's partial local work
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class AllClientsFailed(RuntimeError):
    """Every client of a phase failed: almost always a bug or a bad setting, not churn."""


class NotEnoughClients(RuntimeError):
    """Too few clients came online within coordinator.max_wait_s of virtual time."""


def sample_clients(seed: int, server_round: int, phase: str, k: int, num_clients: int) -> list[int]:
    """k distinct client ids, sorted, drawn from the run seed for this round and phase."""
    if k >= num_clients:
        return list(range(num_clients))
    rng = np_rng(seed, f"sample-{phase}", server_round)
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


@dataclass
class CoordinatorResult:
    arrays: ArrayRecord
    rounds: list[dict[str, Any]] = field(default_factory=list)
    initial_eval: dict[str, float] | None = None


def _get(metrics: MetricRecord | None, key: str) -> float | None:
    if metrics is None or key not in metrics:
        return None
    return float(metrics[key])  # type: ignore[arg-type]


class Coordinator:
    """Runs ``rounds`` rounds of ``strategy`` over a grid, with seeded sampling."""

    def __init__(
        self,
        *,
        strategy: Strategy,
        initial_arrays: ArrayRecord,
        num_clients: int,
        rounds: int,
        train_cohort: int,
        eval_cohort: int,
        seed: int,
        evaluate_fn: EvaluateFn | None = None,
        on_round: RoundHook | None = None,
        reply_timeout_s: float | None = None,
        stop: threading.Event | None = None,
        evaluate_trained: bool = False,
        fold_train: bool = False,
        world: World | None = None,
        policy: CoordinatorSection | None = None,
        on_participation: ParticipationHook | None = None,
        lookahead: bool = False,
    ) -> None:
        self.strategy = strategy
        self.initial_arrays = initial_arrays
        self.num_clients = num_clients
        self.rounds = rounds
        self.train_cohort = train_cohort
        self.eval_cohort = eval_cohort
        self.seed = seed
        self.evaluate_fn = evaluate_fn
        self.on_round = on_round
        self.reply_timeout_s = reply_timeout_s
        self.stop = stop
        self.evaluate_trained = evaluate_trained
        # Hand a weighted-mean strategy one folded reply instead of the whole cohort.
        self.fold_train = fold_train
        self.world = world
        self.policy = policy or CoordinatorSection()
        self.on_participation = on_participation
        # On grids that keep phases in flight: send round r + 1's training right after
        # round r's aggregation, ahead of round r's evaluation, and collect that
        # evaluation (and run the centralized one) after round r + 1's training. The
        # strategy then sees configure_train(r + 1) before configure_evaluate(r), and
        # aggregate_train(r + 1) before aggregate_evaluate(r): safe for strategies whose
        # training does not depend on their evaluation (all of Flower's own).
        self.lookahead = lookahead
        self.clock = 0.0  # virtual seconds since the run began

    def sample(
        self, server_round: int, phase: str, k: int, online: np.ndarray | None = None
    ) -> list[int]:
        """k distinct clients, sorted; among the ``online`` mask's clients when given."""
        if online is None:
            return sample_clients(self.seed, server_round, phase, k, self.num_clients)
        ids = np.flatnonzero(online)
        if k >= len(ids):
            return ids.tolist()
        rng = np_rng(self.seed, f"sample-online-{phase}", server_round)
        return sorted(int(c) for c in rng.choice(ids, size=k, replace=False))

    def _wait_for_clients(self, server_round: int) -> tuple[np.ndarray | None, int]:
        """Advance the clock until ``min_replies`` clients are online (or give up)."""
        if self.world is None:
            return None, self.num_clients
        p = self.policy
        waited = 0.0
        while True:
            online = self.world.online(self.clock)
            n = self.num_clients if online is None else int(online.sum())
            if n >= p.min_replies:
                return online, n
            if waited >= p.max_wait_s:
                raise NotEnoughClients(
                    f"round {server_round}: only {n} client(s) online at virtual time "
                    f"{self.clock:.0f} s after waiting {waited:.0f} s "
                    f"(coordinator.max_wait_s); {p.min_replies} needed (coordinator.min_replies)"
                )
            step = min(p.wait_step_s, p.max_wait_s - waited)
            waited += step
            self.clock += step

    def _plan(self, server_round: int, cids: list[int], arrays: ArrayRecord) -> RoundPlan:
        world, p = self.world, self.policy
        assert world is not None
        ids = np.asarray(cids, dtype=np.int64)
        if self._model_bytes is None:
            self._model_bytes = sum(len(a.data) for a in arrays.values())
        timing, steps = world.timing(ids, model_bytes=self._model_bytes, server_round=server_round)
        dropped = world.dropout.dropped_many(ids, server_round)
        return plan_round(
            ids,
            timing,
            steps,
            dropped,
            k=self.train_cohort,
            deadline_s=p.deadline_s,
            partial=p.straggler_policy == "partial",
            min_replies=p.min_replies,
            min_round_s=p.min_round_s,
        )

    def _send(
        self,
        grid: Grid,
        directory: ClientDirectory,
        server_round: int,
        phase: str,
        cids: list[int],
        arrays: ArrayRecord,
        fold: bool = False,
        max_steps: dict[int, int] | None = None,
        expected_failures: int = 0,
    ) -> _Sent:
        """Let the strategy configure ``phase`` for exactly ``cids``, then send.

        ``max_steps`` caps a client's local optimizer steps (partial work of a straggler).
        fedsim's grid starts the phase at once (``submit_phase``); other grids get the
        messages when ``_receive`` exchanges them.
        """
        if phase == "train":
            configure, key = self.strategy.configure_train, 0
        else:
            configure, key = self.strategy.configure_evaluate, 1
        view = SubsetGrid(grid, [directory.node_of(c) for c in cids])
        with pinned_global_random(int_seed(self.seed, "strategy-random", server_round, key)):
            msgs = list(configure(server_round, arrays, ConfigRecord(), view))
        if max_steps:
            for m in msgs:
                cid = directory.client_of(m.metadata.dst_node_id)
                if cid in max_steps:
                    m.content = _with_config(m.content, {MAX_STEPS_KEY: max_steps[cid]})
        msgs.sort(key=lambda m: directory.client_of(m.metadata.dst_node_id))
        handle = grid.submit_phase(msgs, fold=fold) if hasattr(grid, "submit_phase") else None
        return _Sent(phase, server_round, msgs, expected_failures, handle)

    def _receive(
        self, grid: Grid, sent: _Sent
    ) -> tuple[list[Message | None], int, int, list[Message], list[Block] | None]:
        """The replies to a sent phase in cohort order (by client id; None if missing).

        When the phase was sent with ``fold`` to fedsim's grid, the replies carry metrics
        only and the partial sums of their arrays come back as blocks.
        """
        msgs, phase, server_round = sent.msgs, sent.phase, sent.server_round
        blocks = None
        if sent.handle is not None:
            replies, blocks = grid.collect_phase(sent.handle, timeout=self.reply_timeout_s)  # type: ignore[attr-defined]
        else:
            replies = exchange(grid, msgs, timeout=self.reply_timeout_s, stop=self.stop)
        by_id = {r.metadata.reply_to_message_id: r for r in replies}
        ordered = [by_id.get(m.metadata.message_id) for m in msgs]
        errors = [r for r in replies if r.has_error()]
        ok = len(replies) - len(errors)
        failed = len(msgs) - ok
        if msgs and ok == 0 and len(msgs) > sent.expected_failures:
            reason = errors[0].error.reason if errors else "no replies before the timeout"
            raise AllClientsFailed(
                f"round {server_round}: all {len(msgs)} clients failed in {phase}: {reason}"
            )
        if len(errors) > sent.expected_failures:
            log.warning(
                "round %d %s: %d client(s) failed, e.g. %s",
                server_round,
                phase,
                len(errors),
                errors[0].error.reason.strip().splitlines()[-1:],
            )
        return ordered, ok, failed, msgs, blocks

    def _start_round(
        self, grid: Grid, directory: ClientDirectory, rnd: int, arrays: ArrayRecord
    ) -> _RoundStart:
        """Wait for clients, sample and plan round ``rnd``, and send its training."""
        online, n_online = self._wait_for_clients(rnd)
        k = select_count(self.train_cohort, self.policy.over_commit, n_online)
        cids = self.sample(rnd, "train", k, online)
        plan = self._plan(rnd, cids, arrays) if self.world is not None else None
        run_cids = cids if plan is None else ([] if plan.skipped else plan.to_run)
        dropouts = 0 if plan is None else sum(plan.status[c] == DROPPED for c in run_cids)
        train = None
        if run_cids:
            train = self._send(
                grid,
                directory,
                rnd,
                "train",
                run_cids,
                arrays,
                fold=self.fold_train,
                max_steps=None if plan is None else plan.max_steps,
                expected_failures=dropouts,
            )
        return _RoundStart(online, n_online, cids, plan, run_cids, dropouts, train)

    def run(self, grid: Grid) -> CoordinatorResult:
        directory = ClientDirectory.discover(grid, self.num_clients, stop=self.stop)
        arrays = self.initial_arrays
        result = CoordinatorResult(arrays=arrays)
        self._model_bytes: int | None = None
        if self.evaluate_fn is not None:
            init = self.evaluate_fn(0, arrays)
            if init is not None:
                result.initial_eval = {k: float(v) for k, v in init.items()}  # type: ignore[arg-type]
        ahead = self.lookahead and hasattr(grid, "submit_phase")
        nxt: _RoundStart | Exception | None = None
        open_round: _OpenRound | None = None  # trained, its evaluation still in flight
        t_update = time.perf_counter()  # when the model last changed (round 0: the start)

        try:
            for rnd in range(1, self.rounds + 1):
                if nxt is None:
                    start = self._start_round(grid, directory, rnd, arrays)
                elif isinstance(nxt, Exception):
                    raise nxt
                else:  # started during the previous round
                    start = nxt
                nxt = None
                record: dict[str, Any] = {"round": rnd}
                cids, plan, run_cids, dropouts = (
                    start.cids,
                    start.plan,
                    start.run_cids,
                    start.dropouts,
                )

                replies: list[Message] = []
                ok = failed = 0
                good: list[int] = []
                if start.train is not None:
                    ordered, ok, failed, sent, blocks = self._receive(grid, start.train)
                    good = [
                        c for c, r in zip(run_cids, ordered, strict=True) if r and not r.has_error()
                    ]
                    if self.fold_train:
                        folded = fold_weighted_mean(
                            ordered, with_arrays=True, reply_to=sent[0], blocks=blocks
                        )
                        replies = [folded] if folded is not None else []
                    else:
                        replies = [r for r in ordered if r is not None]
                status = dict.fromkeys(cids, AGGREGATED) if plan is None else plan.status
                for c in run_cids:  # a planned reply that failed for real is lost too
                    if status[c] == AGGREGATED and c not in good:
                        status[c] = DROPPED
                n_agg = sum(1 for c in run_cids if status[c] == AGGREGATED)
                skipped = n_agg < self.policy.min_replies
                train_metrics = None
                if skipped:
                    log.warning(
                        "round %d skipped: %d replies to aggregate, coordinator.min_replies = %d",
                        rnd,
                        n_agg,
                        self.policy.min_replies,
                    )
                    for c in cids:
                        if status[c] == AGGREGATED:
                            status[c] = REPLIED
                else:
                    new_arrays, train_metrics = self.strategy.aggregate_train(rnd, replies)
                    if new_arrays is not None:
                        arrays = new_arrays
                t_from, t_update = t_update, time.perf_counter()
                if plan is not None:
                    self.clock += plan.duration_s
                record["train_loss"] = _get(train_metrics, "train_loss")
                record["virtual_time_s"] = self.clock if self.world is not None else None
                record["clients_online"] = start.n_online
                record["clients_selected"] = len(cids)
                record["clients_replied"] = ok
                record["clients_failed"] = failed - dropouts if failed >= dropouts else failed
                record["clients_dropped"] = sum(1 for v in status.values() if v == DROPPED)
                record["clients_late"] = sum(1 for v in status.values() if v == LATE)
                record["clients_aggregated"] = 0 if skipped else n_agg
                record["round_skipped"] = skipped
                if self.on_participation is not None:
                    self.on_participation(rnd, start.online, status)

                if ahead and rnd < self.rounds:
                    # Queue the next round's training on the workers now, ahead of this
                    # round's evaluation: a worker that finishes it runs this evaluation (and
                    # the one before) while the coordinator aggregates, so no worker waits for
                    # the coordinator between rounds. Nothing later in this round reads what
                    # starting it changes.
                    try:
                        nxt = self._start_round(grid, directory, rnd + 1, arrays)
                    except Exception as exc:  # raised when round rnd + 1 begins, as without
                        nxt = exc
                esent = None
                if self.eval_cohort > 0:
                    if self.evaluate_trained:
                        ecids = [c for c in cids if status[c] == AGGREGATED]
                    else:
                        ecids = self.sample(
                            rnd, "evaluate", min(self.eval_cohort, start.n_online), start.online
                        )
                    if ecids:
                        esent = self._send(grid, directory, rnd, "evaluate", ecids, arrays)
                if open_round is not None:
                    done, open_round = open_round, None
                    self._finish(grid, done, result)
                open_round = _OpenRound(record, esent, arrays, t_from, t_update)
                if not ahead or rnd == self.rounds:
                    done, open_round = open_round, None
                    self._finish(grid, done, result)
        except Exception:
            # A round that trained before the error still gets its evaluation and its
            # record, as it would have without the overlap.
            if open_round is not None:
                try:
                    self._finish(grid, open_round, result)
                except Exception as exc:  # the first error is the one to report
                    log.warning(
                        "round %d could not be recorded: %s", open_round.record["round"], exc
                    )
            raise

        result.arrays = arrays
        return result

    def _finish(self, grid: Grid, done: _OpenRound, result: CoordinatorResult) -> None:
        """Collect a round's evaluation, run the centralized one, and record the round.

        A round's wall time runs from the previous round's model update to its own (the
        last round's: to its end), so the rounds' times add up to the run's whether or
        not evaluations overlap the next round's training.
        """
        rnd, record = done.record["round"], done.record
        client_eval: MetricRecord | None = None
        if done.esent is not None:
            eordered, _, _, emsgs, _ = self._receive(grid, done.esent)
            # A client with an empty held-out split has nothing to report.
            ereplies = [
                r for r in eordered if r is not None and not r.has_error() and num_examples(r) > 0
            ]
            if ereplies:
                # Every Flower strategy averages evaluation metrics by num-examples.
                folded = fold_weighted_mean(ereplies, with_arrays=False, reply_to=emsgs[0])
                client_eval = self.strategy.aggregate_evaluate(rnd, [folded])
        record["client_eval_loss"] = _get(client_eval, "eval_loss")
        record["client_eval_accuracy"] = _get(client_eval, "eval_accuracy")
        central = self.evaluate_fn(rnd, done.arrays) if self.evaluate_fn is not None else None
        record["eval_loss"] = _get(central, "eval_loss")
        record["eval_accuracy"] = _get(central, "eval_accuracy")
        end = time.perf_counter() if rnd == self.rounds else done.t_update
        record["round_wall_s"] = end - done.t_from
        result.rounds.append(record)
        if self.on_round is not None:
            self.on_round(record)


@dataclass
class _Sent:
    """A phase's instructions, sent (or, for grids that only exchange, about to be)."""

    phase: str
    server_round: int
    msgs: list[Message]  # sorted by client id: the cohort's positions
    expected_failures: int
    handle: Any  # the grid's handle of the phase in flight; None: exchange on receipt


@dataclass
class _OpenRound:
    """A round trained and recorded so far, its evaluation sent and not yet collected."""

    record: dict[str, Any]
    esent: _Sent | None
    arrays: ArrayRecord  # the model the round ended with (for the centralized evaluation)
    t_from: float  # perf_counter of the previous round's model update (or the run's start)
    t_update: float  # and of this round's


@dataclass
class _RoundStart:
    """A round up to its training phase in flight."""

    online: np.ndarray | None
    n_online: int
    cids: list[int]  # selected
    plan: RoundPlan | None
    run_cids: list[int]  # sent a training task
    dropouts: int  # planned to drop out
    train: _Sent | None


def _with_config(content: RecordDict, extra: dict[str, int]) -> RecordDict:
    """A copy of ``content`` whose ConfigRecord also carries ``extra`` (arrays shared)."""
    out = RecordDict()
    done = False
    for key, rec in content.items():
        if isinstance(rec, ConfigRecord) and not done:
            rec = ConfigRecord({**dict(rec.items()), **extra})
            done = True
        out[key] = rec
    if not done:
        out["config"] = ConfigRecord(dict(extra))
    return out
