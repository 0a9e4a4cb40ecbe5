"""Round protocols: a round is a declared sequence of stages, each send -> collect ->
aggregate.

Plain federated averaging has two stages: ``TrainStage`` (sample and plan the cohort,
send the global model, fold the replies, let the strategy aggregate) and
``EvaluateStage`` (federated evaluation of the new model, then the centralized one). A
protocol with more message exchanges per round (SecAgg+'s key exchange, share, masked
input and unmask stages; SCAFFOLD's extra arrays) is a new ``RoundProtocol`` with its
own stages, not an edit of the coordinator.

When stages run is the coordinator's business, not the protocol's: the stages after the
last one that changes the model (``updates_model = False``) may be sent after the next
round has started and collected later (``Coordinator.run``). A stage therefore reads the
model of its own round (``Round.arrays``), never the coordinator's current one.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from fedsim.arrays import conform
from fedsim.engine.attacks import craft_replies
from fedsim.engine.fold import fold_weighted_mean, num_examples, records
from fedsim.engine.policy import (
    AGGREGATED,
    DROPPED,
    LATE,
    REPLIED,
    RoundPlan,
    select_count,
)
from fedsim.engine.screening import (
    check_replies,
    finish_mean,
    finish_model,
    rejection,
    screen_replies,
)
from fedsim.privacy.config import DP_STEPS
from fedsim.privacy.mechanisms import CLIP_KEY, CLIPPED
from fedsim.world.participation import REJECTED

if TYPE_CHECKING:
    from fedsim.engine.coordinator import Coordinator, Replies, Sent

log = logging.getLogger("fedsim")


@dataclass
class RoundRecord:
    """One line of ``metrics.jsonl`` (fields in file order; ``extra`` comes last but one)."""

    round: int
    train_loss: float | None = None
    virtual_time_s: float | None = None
    clients_online: int = 0
    clients_selected: int = 0
    clients_replied: int = 0
    clients_failed: int = 0
    clients_dropped: int = 0
    clients_late: int = 0
    clients_rejected: int = 0  # left out by a per-update transform (see fedsim.transforms)
    clients_aggregated: int = 0
    round_skipped: bool = False
    eval_clients_rejected: int = 0  # evaluation replies left out as invalid
    client_eval_loss: float | None = None
    client_eval_accuracy: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # a protocol's own metrics
    round_wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        extra = out.pop("extra")
        wall = out.pop("round_wall_s")
        return {**out, **extra, "round_wall_s": wall}


@dataclass
class Round:
    """What a round knows as its stages run."""

    number: int
    arrays: ArrayRecord  # the global model: at the start, then as each stage leaves it
    record: RoundRecord
    online: np.ndarray | None = None  # mask of online clients (None: all)
    n_online: int = 0
    selected: list[int] = field(default_factory=list)
    plan: RoundPlan | None = None
    status: dict[int, str] = field(default_factory=dict)  # participation, per client
    sent: dict[str, Sent | None] = field(default_factory=dict)  # stage name -> in flight
    t_from: float = 0.0  # perf_counter of the model update before this round
    t_update: float = 0.0  # and of this round's
    snapshot: Any = None  # the run's state after this round, when a checkpoint is due
    config: dict[str, Any] = field(default_factory=dict)  # what every training config adds


class Stage(ABC):
    """One message exchange of a round: send, collect, aggregate."""

    name: ClassVar[str]
    #: Whether ``aggregate`` may change the global model. Stages after the last one that
    #: does may overlap the next round (see the module docstring).
    updates_model: ClassVar[bool]

    @abstractmethod
    def send(self, co: Coordinator, rnd: Round) -> Sent | None:
        """Configure and send the stage's messages (None: nothing to send)."""

    def collect(self, co: Coordinator, rnd: Round, sent: Sent | None) -> Replies | None:
        """The replies, in cohort order (see ``Coordinator.receive``)."""
        return None if sent is None else co.receive(sent)

    @abstractmethod
    def aggregate(self, co: Coordinator, rnd: Round, replies: Replies | None) -> None:
        """Fold the replies into the round: its model, its status, its record."""


class RoundProtocol:
    """A round as an ordered sequence of stages."""

    stages: tuple[Stage, ...] = ()

    def split(self) -> tuple[tuple[Stage, ...], tuple[Stage, ...]]:
        """(stages up to the last that updates the model, the rest)."""
        last = max((i for i, s in enumerate(self.stages) if s.updates_model), default=-1)
        return self.stages[: last + 1], self.stages[last + 1 :]


def _metric(metrics: MetricRecord | None, key: str) -> float | None:
    if metrics is None or key not in metrics:
        return None
    return float(metrics[key])  # type: ignore[arg-type]


def _clipped(replies: Replies | None) -> tuple[int | None, int]:
    """(how many of the round's accepted updates were clipped, how many there were);
    None when no reply says (a mechanism without clipping)."""
    if replies is None:
        return None, 0
    notes = [
        records(r.content)[1].get(CLIPPED)
        for r in replies.ordered
        if r is not None and not r.has_error()
    ]
    if not notes or any(v is None for v in notes):
        return None, len(notes)
    return sum(round(float(v)) for v in notes), len(notes)  # type: ignore[arg-type]


def _steps(replies: Replies | None) -> dict[int, int]:
    """The DP-SGD steps each client's reply says it ran (record-level DP)."""
    out: dict[int, int] = {}
    if replies is None:
        return out
    for c, r in zip(replies.cids, replies.ordered, strict=True):
        if r is not None and not r.has_error():
            v = records(r.content)[1].get(DP_STEPS)
            if v is not None:
                out[c] = int(v)  # type: ignore[arg-type]
    return out


class TrainStage(Stage):
    """Sample (among the online clients), plan on the virtual clock, send the global
    model, and hand the strategy the replies (folded to one weighted mean when it only
    needs that)."""

    name = "train"
    updates_model = True

    def send(self, co: Coordinator, rnd: Round) -> Sent | None:
        rnd.online, rnd.n_online = co.wait_for_clients(rnd.number)
        k = select_count(co.train_cohort, co.policy.over_commit, rnd.n_online)
        rnd.selected = co.sample(rnd.number, "train", k, rnd.online)
        rnd.plan = co.plan(rnd.number, rnd.selected, rnd.arrays)
        plan = rnd.plan
        run = rnd.selected if plan is None else ([] if plan.skipped else plan.to_run)
        rnd.status = dict.fromkeys(rnd.selected, AGGREGATED) if plan is None else plan.status
        if not run:
            return None
        dropouts = 0 if plan is None else sum(plan.status[c] == DROPPED for c in run)
        # The DP mechanism's round settings (adaptive clipping's C_t) go to everyone.
        rnd.config = {} if co.ledger is None else co.ledger.round_config()
        extra = {} if plan is None else co.plan_config(plan, run)
        if rnd.config:
            extra = {c: {**rnd.config, **extra.get(c, {})} for c in run}
        return co.send(
            rnd.number,
            "train",
            run,
            rnd.arrays,
            fold=co.fold_train and not co.crafts,
            extra_config=extra or None,
            expected_failures=dropouts,
        )

    def aggregate(self, co: Coordinator, rnd: Round, replies: Replies | None) -> None:
        rec, status = rnd.record, rnd.status
        to_strategy: list[Message] = []
        rejected = 0
        if replies is not None:
            # fedsim's workers have validated the replies and run the per-update
            # transforms; otherwise that happens here, on the same numbers.
            updates = None
            if not co.grid_screens:  # an invalid reply is rejected here as in a worker
                if co.crafts:  # omniscient attackers reply, before any screening
                    craft_replies(co.attack, co.attackers, replies, rnd.number, co.seed)  # type: ignore[arg-type]
                updates = screen_replies(replies, co.chains, co.limits, fold=co.fold_train)
                co.check_failures(replies, "train", rnd.number)
            if co.fold_train:
                folded = fold_weighted_mean(
                    replies.ordered,
                    with_arrays=True,
                    reply_to=replies.msgs[0],
                    blocks=replies.blocks,
                    updates=updates,
                    finish=finish_mean(co.chains, rnd.number, rnd.config),
                    weight_of=co.chains.weight,
                )
                to_strategy = [folded] if folded is not None else []
            else:
                to_strategy = [r for r in replies.ordered if r is not None]
            good = set(replies.ok_clients)
            for c, r in zip(replies.cids, replies.ordered, strict=True):
                # a planned reply that failed for real is lost too
                if status[c] == AGGREGATED and c not in good:
                    reason = rejection(r)
                    rejected += reason is not None
                    status[c] = DROPPED if reason is None else f"{REJECTED}:{reason}"
        ran = [] if replies is None else replies.cids
        n_agg = sum(1 for c in ran if status[c] == AGGREGATED)
        rec.round_skipped = n_agg < co.policy.min_replies
        metrics = None
        if rec.round_skipped:
            log.warning(
                "round %d skipped: %d replies to aggregate, coordinator.min_replies = %d",
                rnd.number,
                n_agg,
                co.policy.min_replies,
            )
            for c in rnd.selected:
                if status[c] == AGGREGATED:
                    status[c] = REPLIED
        else:
            new_arrays, metrics = co.strategy.aggregate_train(rnd.number, to_strategy)
            if new_arrays is not None and not co.fold_train:  # (a folded mean: done)
                weight = sum(
                    co.chains.weight(num_examples(r)) for r in to_strategy if not r.has_error()
                )
                new_arrays = finish_model(
                    co.chains, rnd.number, rnd.arrays, new_arrays, weight, rnd.config
                )
            if new_arrays is not None:
                rnd.arrays = conform(new_arrays, rnd.arrays)  # the model keeps its dtypes
        if rnd.plan is not None:
            co.clock += rnd.plan.duration_s
        planned = 0 if replies is None else replies.expected_failures
        failed = (0 if replies is None else replies.failed) - rejected
        rec.train_loss = _metric(metrics, "train_loss")
        rec.virtual_time_s = co.clock if co.world is not None else None
        rec.clients_online = rnd.n_online
        rec.clients_selected = len(rnd.selected)
        rec.clients_replied = 0 if replies is None else replies.ok
        rec.clients_failed = failed - planned if failed >= planned else failed
        rec.clients_dropped = sum(1 for v in status.values() if v == DROPPED)
        rec.clients_late = sum(1 for v in status.values() if v == LATE)
        rec.clients_rejected = rejected
        rec.clients_aggregated = 0 if rec.round_skipped else n_agg
        if co.ledger is not None:
            clipped, n_ok = _clipped(replies)
            co.ledger.observe(
                rnd.number,
                # every client that ran and did not vanish sent its update
                released=[c for c in ran if status[c] != DROPPED],
                clipped=clipped,
                aggregated=n_ok,
                skipped=rec.round_skipped,
                steps=_steps(replies),
            )
            rec.extra["dp_epsilon"] = co.ledger.round_epsilon(rnd.number)
            rec.extra["dp_clipped_fraction"] = (
                None if clipped is None or not n_ok else round(clipped / n_ok, 9)
            )
            if CLIP_KEY in rnd.config:
                rec.extra["dp_clip_norm"] = rnd.config[CLIP_KEY]
        if co.attack is not None:
            attackers = [c for c in rnd.selected if c in co.attackers]
            rec.extra["attackers_selected"] = len(attackers)
            rec.extra["attackers_aggregated"] = sum(status[c] == AGGREGATED for c in attackers)
        if co.on_participation is not None:
            co.on_participation(rnd.number, rnd.online, status)


class EvaluateStage(Stage):
    """Federated evaluation of the round's model on a sample of clients (or the ones that
    trained), then the centralized evaluation on the server's test split."""

    name = "evaluate"
    updates_model = False

    def send(self, co: Coordinator, rnd: Round) -> Sent | None:
        if co.eval_cohort <= 0:
            return None
        if co.evaluate_trained:
            cids = [c for c in rnd.selected if rnd.status[c] == AGGREGATED]
        else:
            k = min(co.eval_cohort, rnd.n_online)
            cids = co.sample(rnd.number, "evaluate", k, rnd.online)
        return co.send(rnd.number, "evaluate", cids, rnd.arrays) if cids else None

    def aggregate(self, co: Coordinator, rnd: Round, replies: Replies | None) -> None:
        client_eval: MetricRecord | None = None
        rec = rnd.record
        if replies is not None:
            if not co.grid_screens:  # (fedsim's workers validate their own replies)
                check_replies(replies, co.limits)
            rec.eval_clients_rejected = sum(rejection(r) is not None for r in replies.ordered)
            # A client with an empty held-out split has nothing to report.
            ok = [
                r
                for r in replies.ordered
                if r is not None and not r.has_error() and num_examples(r) > 0
            ]
            if ok:
                # Every Flower strategy averages evaluation metrics by num-examples.
                folded = fold_weighted_mean(ok, with_arrays=False, reply_to=replies.msgs[0])
                client_eval = co.strategy.aggregate_evaluate(rnd.number, [folded])  # type: ignore[list-item]
        rec.client_eval_loss = _metric(client_eval, "eval_loss")
        rec.client_eval_accuracy = _metric(client_eval, "eval_accuracy")
        central = co.evaluate_fn(rnd.number, rnd.arrays) if co.evaluate_fn is not None else None
        rec.eval_loss = _metric(central, "eval_loss")
        rec.eval_accuracy = _metric(central, "eval_accuracy")


class FedAvgProtocol(RoundProtocol):
    """Train, then evaluate: every registered Flower strategy runs on it."""

    stages = (TrainStage(), EvaluateStage())
