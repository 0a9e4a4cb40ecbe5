"""The coordinator: fedsim's round loop wrapped around any Flower strategy.

It owns the policies a strategy should not have to know about: which clients take part
(sampled with fedsim's own seeded generator, not the global ``random`` that Flower's
``sample_nodes`` reads), the order replies are aggregated in (by client id, so worker
timing never changes a result), failed replies, and the per-round record. What a round
exchanges with the clients is its protocol's (``fedsim.engine.protocol``); when each
stage runs, overlapping a round's last stages with the next round, is decided here.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.arrays import to_array
from fedsim.attack_params import AttackParams
from fedsim.client_params import DROPOUT_KEY, MAX_STEPS_KEY
from fedsim.engine import checkpoint
from fedsim.engine.checkpoint import Snapshot
from fedsim.engine.fold import Block
from fedsim.engine.messaging import (
    POLL_S,
    ClientDirectory,
    PhasedGrid,
    SubsetGrid,
    exchange,
    pinned_global_random,
)
from fedsim.engine.policy import DROPPED, RoundPlan, plan_round
from fedsim.engine.protocol import FedAvgProtocol, Round, RoundProtocol, RoundRecord, Stage
from fedsim.engine.screening import rejection
from fedsim.engine.validation import ReplyLimits
from fedsim.rng import int_seed, np_rng
from fedsim.transforms import Chains
from fedsim.world.config import CoordinatorSection

if TYPE_CHECKING:
    from fedsim.privacy.ledger import Ledger
    from fedsim.world import World

log = logging.getLogger("fedsim")

RoundHook = Callable[[dict[str, Any]], None]
ParticipationHook = Callable[[int, "np.ndarray | None", dict[int, str]], None]
CheckpointHook = Callable[[Snapshot], None]
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
    ledger: Any = None  # the privacy ledger as the run left it (per-client counts)


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
        protocol: RoundProtocol | None = None,
        chains: Chains | None = None,
        limits: ReplyLimits | None = None,
        attack: AttackParams | None = None,
        checkpoint_every: int | None = None,
        on_checkpoint: CheckpointHook | None = None,
        resume: Snapshot | None = None,
        ledger: Ledger | None = None,
        node_wait_s: float = 120.0,
        max_poll_s: float = POLL_S,
        local_data: bool | None = None,
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
        self.node_wait_s = node_wait_s  # for every client's node to join (real grids)
        self.max_poll_s = max_poll_s  # the longest step between pulls of a polled grid
        self.local_data = local_data  # real nodes on their own data folders (or not)
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
        self.protocol = protocol or FedAvgProtocol()
        self.chains = chains or Chains()  # the scenario's update transforms
        self.limits = limits or ReplyLimits()  # what a client's reply may claim
        self.attack = attack if attack is not None and attack.active else None
        self.attackers: frozenset[int] = frozenset(
            () if self.attack is None else attack.attackers(num_clients, seed).tolist()  # type: ignore[union-attr]
        )
        # Omniscient attacks are crafted here, from the round's unfolded replies.
        self.crafts = self.attack is not None and type(self.attack).omniscient
        self.clock = 0.0  # virtual seconds since the run began
        # Every checkpoint_every rounds (not after the last), the state after that round
        # goes to on_checkpoint once the round's record is written; resume continues
        # from such a snapshot.
        self.checkpoint_every = checkpoint_every
        self.on_checkpoint = on_checkpoint
        self.resume = resume
        # Differential privacy: epsilon after each round; with privacy.stop_at_budget the
        # run ends before the round that would exceed the budget.
        self.ledger = ledger
        if ledger is not None:
            self.rounds = ledger.max_rounds(rounds)

    def sample(
        self, server_round: int, phase: str, k: int, online: np.ndarray | None = None
    ) -> list[int]:
        """k distinct clients, sorted; among the ``online`` mask's clients when given.
        Training cohorts under ``coordinator.sampling = "poisson"``: each (online)
        client independently with probability k / num_clients."""
        if phase == "train" and self.policy.sampling == "poisson":
            return self._poisson(server_round, k, online)
        if online is None:
            return sample_clients(self.seed, server_round, phase, k, self.num_clients)
        ids = np.flatnonzero(online)
        if k >= len(ids):
            return ids.tolist()
        rng = np_rng(self.seed, f"sample-online-{phase}", server_round)
        return sorted(int(c) for c in rng.choice(ids, size=k, replace=False))

    def _poisson(self, server_round: int, k: int, online: np.ndarray | None) -> list[int]:
        # q from the configured cohort, not from k (which is capped by who is online)
        k = math.ceil(self.train_cohort * self.policy.over_commit - 1e-9)
        q = min(1.0, k / self.num_clients)
        rng = np_rng(self.seed, "sample-poisson-train", server_round)
        # One uniform per client of the population, online or not, so a client's draw
        # does not depend on who else is online.
        chosen = rng.random(self.num_clients) < q
        if online is not None:
            chosen &= online
        return np.flatnonzero(chosen).tolist()

    # -- services the stages use ---------------------------------------------------
    def wait_for_clients(self, server_round: int) -> tuple[np.ndarray | None, int]:
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

    def plan(self, server_round: int, cids: list[int], arrays: ArrayRecord) -> RoundPlan | None:
        """Who of ``cids`` will reply when, drop out or straggle (None: no world)."""
        world, p = self.world, self.policy
        if world is None:
            return None
        ids = np.asarray(cids, dtype=np.int64)
        if self._model_bytes is None:  # (the model's size: its dtypes never change)
            self._model_bytes = sum(len(a.data) for a in self.initial_arrays.values())
        timing, steps = world.timing(ids, model_bytes=self._model_bytes, server_round=server_round)
        dropped = world.dropout.dropped_many(ids, server_round)
        return plan_round(
            ids,
            timing,
            steps,
            dropped,
            # Poisson cohorts are aggregated whole: their size is the sampling's, and
            # over_commit's "first K" would cut it by speed.
            k=len(cids) if p.sampling == "poisson" else self.train_cohort,
            deadline_s=p.deadline_s,
            partial=p.straggler_policy == "partial",
            min_replies=p.min_replies,
            min_round_s=p.min_round_s,
        )

    @staticmethod
    def plan_config(plan: RoundPlan, run_cids: list[int]) -> dict[int, dict[str, Any]]:
        """What the plan tells clients in their config: partial work, and dropping out
        (decided here, once; the ClientApp raises on it)."""
        extra: dict[int, dict[str, Any]] = {
            c: {MAX_STEPS_KEY: s} for c, s in plan.max_steps.items()
        }
        for c in run_cids:
            if plan.status[c] == DROPPED:
                extra.setdefault(c, {})[DROPOUT_KEY] = True
        return extra

    def send(
        self,
        server_round: int,
        phase: str,
        cids: list[int],
        arrays: ArrayRecord,
        *,
        fold: bool = False,
        extra_config: dict[int, dict[str, Any]] | None = None,
        expected_failures: int = 0,
    ) -> Sent:
        """Let the strategy configure ``phase`` for exactly ``cids``, then send.

        ``extra_config`` adds keys to some clients' config (the plan's partial work of a
        straggler, or its dropout). A ``PhasedGrid`` starts the phase at once; other
        grids get the messages when ``receive`` exchanges them.
        """
        grid, directory = self._grid, self._directory
        if phase == "train":
            configure, key = self.strategy.configure_train, 0
        else:
            configure, key = self.strategy.configure_evaluate, 1
        view = SubsetGrid(grid, [directory.node_of(c) for c in cids])
        with pinned_global_random(int_seed(self.seed, "strategy-random", server_round, key)):
            msgs = list(configure(server_round, arrays, ConfigRecord(), view))
        if extra_config:
            for m in msgs:
                cid = directory.client_of(m.metadata.dst_node_id)
                if cid in extra_config:
                    m.content = _with_config(m.content, extra_config[cid])
        msgs.sort(key=lambda m: directory.client_of(m.metadata.dst_node_id))
        if self.reply_timeout_s is not None and not isinstance(grid, PhasedGrid):
            # A real node that has not fetched its message when the phase stops waiting
            # must not train on it later (its reply would be ignored, its state changed):
            # the SuperLink drops a message whose time to live has run out.
            for m in msgs:
                m.metadata.ttl = self.reply_timeout_s
        handle = grid.submit_phase(msgs, fold=fold) if isinstance(grid, PhasedGrid) else None
        return Sent(phase, server_round, msgs, expected_failures, handle)

    def receive(self, sent: Sent) -> Replies:
        """The replies to a sent phase in cohort order (by client id; None if missing).

        When the phase was sent with ``fold`` to a ``PhasedGrid``, the replies carry
        metrics only and the partial sums of their arrays come back as blocks.
        """
        msgs, phase, server_round = sent.msgs, sent.phase, sent.server_round
        blocks = None
        if sent.handle is not None:
            replies, blocks = self._grid.collect_phase(sent.handle, timeout=self.reply_timeout_s)  # type: ignore[attr-defined]
        else:
            replies = exchange(
                self._grid,
                msgs,
                timeout=self.reply_timeout_s,
                stop=self.stop,
                max_poll_s=self.max_poll_s,
            )
        by_id = {r.metadata.reply_to_message_id: r for r in replies}
        ordered = [by_id.get(m.metadata.message_id) for m in msgs]
        errors = [r for r in replies if r.has_error() and rejection(r) is None]
        cids = [self._directory.client_of(m.metadata.dst_node_id) for m in msgs]
        out = Replies(cids, msgs, ordered, blocks, sent.expected_failures)
        self.check_failures(out, phase, server_round)
        if len(errors) > sent.expected_failures:
            log.warning(
                "round %d %s: %d client(s) failed, e.g. %s",
                server_round,
                phase,
                len(errors),
                errors[0].error.reason.strip().splitlines()[-1:],
            )
        return out

    @staticmethod
    def check_failures(replies: Replies, phase: str, server_round: int) -> None:
        """Raise AllClientsFailed when no client of a phase succeeded and more failed for
        real than the plan said would drop out (rejections by a transform are not
        failures: a round whose every update was rejected is skipped, not an error)."""
        msgs = replies.msgs
        rejected = sum(1 for r in replies.ordered if rejection(r) is not None)
        real = len(msgs) - replies.ok - rejected
        if msgs and replies.ok == 0 and real > replies.expected_failures:
            errors = [r for r in replies.ordered if r is not None and r.has_error()]
            errors = [r for r in errors if rejection(r) is None]
            reason = errors[0].error.reason if errors else "no replies before the timeout"
            raise AllClientsFailed(
                f"round {server_round}: all {len(msgs)} clients failed in {phase}: {reason}"
            )

    @property
    def grid_screens(self) -> bool:
        """Whether the grid's workers run the per-update transforms (fedsim's do)."""
        screens = isinstance(self._grid, PhasedGrid) and self._grid.screens_updates
        return screens and not self.crafts  # (crafted replies are screened here)

    # -- the run -------------------------------------------------------------------
    def run(self, grid: Grid) -> CoordinatorResult:
        """Every round's stages in order. With ``lookahead`` on a ``PhasedGrid``, round
        r + 1 starts (its first stage is sent) as soon as round r's model is final, ahead
        of round r's remaining stages, which are collected after round r + 1's model
        stages: the workers run them while the coordinator aggregates."""
        result = self._open(grid)
        head, tail = self.protocol.split()
        ahead = self.lookahead and isinstance(grid, PhasedGrid)
        nxt: Round | Exception | None = None  # round r + 1, started early (or its error)
        behind: Round | None = None  # round r - 1: its tail sent, not yet collected
        first = 1 if self.resume is None else self.resume.round + 1
        try:
            for r in range(first, self.rounds + 1):
                if isinstance(nxt, Exception):
                    raise nxt
                rnd, nxt = nxt or self._begin(r), None
                for stage in head:
                    self._finish_stage(stage, rnd)
                rnd.t_update, self.arrays = self._t_update, rnd.arrays
                if ahead and r < self.rounds:
                    if self._checkpoint_due(r):  # (round r + 1 has not begun yet)
                        rnd.snapshot = self._snapshot(r, result)
                    nxt = self._begin_or_error(r + 1)
                for stage in tail:
                    rnd.sent[stage.name] = stage.send(self, rnd)
                if behind is not None:  # (cleared first: a failed close is not retried)
                    done, behind = behind, None
                    self._close(done, tail, result)
                behind = rnd
                if not ahead or r == self.rounds:
                    done, behind = behind, None
                    self._close(done, tail, result)
        except Exception:
            # A round that trained before the error still gets its last stages and its
            # record, as it would have without the overlap.
            if behind is not None:
                try:
                    self._close(behind, tail, result)
                except Exception as exc:  # the first error is the one to report
                    log.warning("round %d could not be recorded: %s", behind.number, exc)
            raise
        result.arrays = self.arrays
        return result

    def _open(self, grid: Grid) -> CoordinatorResult:
        """Find the clients' nodes and evaluate the initial model."""
        self._grid = grid
        self._directory = (
            grid.client_directory()
            if isinstance(grid, PhasedGrid)
            else ClientDirectory.discover(
                grid,
                self.num_clients,
                timeout_s=self.node_wait_s,
                stop=self.stop,
                local_data=self.local_data,
            )
        )
        self._model_bytes: int | None = None
        self.arrays = self.initial_arrays
        self._t_update = time.perf_counter()  # when the model last changed
        result = CoordinatorResult(arrays=self.arrays, ledger=self.ledger)
        if self.resume is not None:
            self._restore(self.resume, result)
        elif self.evaluate_fn is not None:
            init = self.evaluate_fn(0, self.arrays)
            if init is not None:
                result.initial_eval = {k: float(v) for k, v in init.items()}  # type: ignore[arg-type]
        return result

    def _begin(self, number: int) -> Round:
        """A new round on the current model, its first stage sent."""
        rnd = Round(number, self.arrays, RoundRecord(number), t_from=self._t_update)
        first = self.protocol.stages[0]
        rnd.sent[first.name] = first.send(self, rnd)
        return rnd

    def _begin_or_error(self, number: int) -> Round | Exception:
        # Started early: an error is raised when the round would have begun.
        try:
            return self._begin(number)
        except Exception as exc:
            return exc

    def _finish_stage(self, stage: Stage, rnd: Round) -> None:
        if stage.name not in rnd.sent:
            rnd.sent[stage.name] = stage.send(self, rnd)
        stage.aggregate(self, rnd, stage.collect(self, rnd, rnd.sent[stage.name]))
        if stage.updates_model:
            self._t_update = time.perf_counter()

    def _close(self, rnd: Round, tail: tuple[Stage, ...], result: CoordinatorResult) -> None:
        """Collect a round's last stages and record it.

        A round's wall time runs from the previous round's model update to its own (the
        last round's: to its end), so the rounds' times add up to the run's whether or
        not its last stages overlap the next round.
        """
        for stage in tail:
            stage.aggregate(self, rnd, stage.collect(self, rnd, rnd.sent[stage.name]))
        end = time.perf_counter() if rnd.number == self.rounds else rnd.t_update
        rnd.record.round_wall_s = end - rnd.t_from
        record = rnd.record.as_dict()
        result.rounds.append(record)
        if self.on_round is not None:
            self.on_round(record)
        if rnd.snapshot is None and self._checkpoint_due(rnd.number):
            rnd.snapshot = self._snapshot(rnd.number, result)  # the plain order: all done
        if rnd.snapshot is not None and self.on_checkpoint is not None:
            rnd.snapshot.records = list(result.rounds)
            self.on_checkpoint(rnd.snapshot)

    # -- checkpoints ---------------------------------------------------------------
    def _checkpoint_due(self, r: int) -> bool:
        every = self.checkpoint_every
        return every is not None and r % every == 0 and r < self.rounds

    def _snapshot(self, r: int, result: CoordinatorResult) -> Snapshot:
        """The state after round r, taken before round r + 1 begins."""
        grid = self._grid
        return checkpoint.take(
            r,
            model=self.arrays,
            clock=self.clock,
            strategy=self.strategy,
            world=self.world,
            client_states=grid.client_states() if isinstance(grid, PhasedGrid) else None,
            initial_eval=result.initial_eval,
            privacy=None if self.ledger is None else self.ledger.state(),
        )

    def _restore(self, snap: Snapshot, result: CoordinatorResult) -> None:
        """Continue after round ``snap.round`` as if the run had never stopped."""
        state = checkpoint.decode_tree(snap)
        self.arrays = ArrayRecord({k: to_array(v) for k, v in snap.model.items()})
        checkpoint.restore_strategy(self.strategy, state["strategy"])
        if self.world is not None and state["world"] is not None:
            self.world.restore(state["world"])
        if state["clients"] is not None:
            if not isinstance(self._grid, PhasedGrid):
                raise RuntimeError("this engine cannot restore the clients' states")
            self._grid.restore_client_states(state["clients"])
        if self.ledger is not None:
            self.ledger.restore(state["privacy"] or {})
        self.clock = snap.clock
        result.rounds = list(snap.records)
        result.initial_eval = snap.initial_eval


@dataclass
class Sent:
    """A phase's instructions, sent (or, for grids that only exchange, about to be)."""

    phase: str
    server_round: int
    msgs: list[Message]  # sorted by client id: the cohort's positions
    expected_failures: int
    handle: Any  # the grid's handle of the phase in flight; None: exchange on receipt


@dataclass
class Replies:
    """A phase's replies in cohort order (by client id)."""

    cids: list[int]
    msgs: list[Message]  # the instructions
    ordered: list[Message | None]  # the reply to each (None: none came)
    blocks: list[Block] | None  # partial sums, when the workers pre-folded the arrays
    expected_failures: int  # planned dropouts among them

    @property
    def ok(self) -> int:
        """Replies without an error."""
        return sum(1 for r in self.ordered if r is not None and not r.has_error())

    @property
    def failed(self) -> int:
        return len(self.msgs) - self.ok

    @property
    def ok_clients(self) -> list[int]:
        return [c for c, r in zip(self.cids, self.ordered, strict=True) if r and not r.has_error()]


def _with_config(content: RecordDict, extra: dict[str, Any]) -> RecordDict:
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
