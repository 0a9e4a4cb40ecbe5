"""The Flower ``ServerApp`` of a scenario: the coordinator around a registered strategy."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from clients.training import evaluate_model
from fedsim.arrays import torch_state
from fedsim.data import AnyFederation as Federation
from fedsim.engine.checkpoint import Snapshot
from fedsim.engine.coordinator import (
    CheckpointHook,
    Coordinator,
    CoordinatorResult,
    ParticipationHook,
    RoundHook,
)
from fedsim.engine.messaging import POLL_S
from fedsim.engine.validation import ReplyLimits
from fedsim.models import build_model
from fedsim.privacy.ledger import Ledger
from fedsim.world import World

if TYPE_CHECKING:
    from fedsim.scenario import Scenario


def initial_arrays(scn: Scenario, fed: Federation) -> ArrayRecord:
    """The initial global model, deterministic for the run seed."""
    model = build_model(
        scn.model, input_shape=fed.input_shape, num_classes=fed.num_classes, seed=scn.run.seed
    )
    return ArrayRecord(model.state_dict())


def make_evaluate_fn(scn: Scenario, fed: Federation):
    """Centralized evaluation of the global model on the server's test split."""
    model = build_model(
        scn.model, input_shape=fed.input_shape, num_classes=fed.num_classes, seed=scn.run.seed
    )

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(torch_state(arrays))
        res = evaluate_model(
            model, fed.x_test, fed.y_test, batch_size=max(scn.client.eval_batch_size, 512)
        )
        return MetricRecord({"eval_loss": res.loss, "eval_accuracy": res.accuracy})

    return evaluate


def reply_limit(scn: Scenario, fed: Federation) -> int:
    """The most bytes a reply may have (``ReplyLimits.reply_limit`` of the scenario)."""
    limits = ReplyLimits.of(fed, max_reply_bytes=scn.coordinator.max_reply_bytes)
    if limits.max_reply_bytes is not None:
        return limits.max_reply_bytes
    return limits.reply_limit(initial_arrays(scn, fed))


def reply_limits(scn: Scenario, fed: Federation) -> ReplyLimits:
    """What a reply may claim. Nodes on their own data folders
    (``deployment.client_data = "local"``) hold shards the coordinator does not know:
    only ``coordinator.max_examples`` caps their counts."""
    co = scn.coordinator
    if scn.simulation.engine == "deployment" and scn.deployment.client_data == "local":
        return ReplyLimits(max_examples=co.max_examples, max_reply_bytes=co.max_reply_bytes)
    return ReplyLimits.of(fed, co.max_examples, co.max_reply_bytes)


@dataclass
class ServerOutcome:
    """Filled by the ServerApp; read by the engine once the app returns."""

    result: CoordinatorResult | None = None
    error: BaseException | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def build_coordinator(
    scn: Scenario,
    fed: Federation,
    world: World,
    on_round: RoundHook | None,
    stop: threading.Event | None = None,
    on_participation: ParticipationHook | None = None,
    on_checkpoint: CheckpointHook | None = None,
    resume: Snapshot | None = None,
) -> Coordinator:
    s = scn.strategy
    deployed = scn.simulation.engine == "deployment"
    return Coordinator(
        strategy=s.build(client_lr=scn.client.lr),
        initial_arrays=initial_arrays(scn, fed),
        num_clients=scn.num_clients,
        rounds=scn.run.rounds,
        train_cohort=scn.train_cohort,
        eval_cohort=scn.eval_cohort,
        seed=scn.run.seed,
        evaluate_fn=make_evaluate_fn(scn, fed) if s.centralized_evaluation else None,
        on_round=on_round,
        stop=stop,
        evaluate_trained=s.evaluate_trained_clients,
        fold_train=type(s).weighted_mean,
        world=world,
        policy=scn.coordinator,
        on_participation=on_participation,
        lookahead=type(s).overlaps_evaluation,
        chains=scn.chains(),
        limits=reply_limits(scn, fed),
        attack=scn.attack,
        checkpoint_every=scn.run.checkpoint_every,
        on_checkpoint=on_checkpoint,
        resume=resume,
        ledger=Ledger.of(scn, shard_sizes=fed.train_sizes()),
        # Simulated clients never hang; real ones may: a phase waits a bounded time.
        reply_timeout_s=scn.deployment.round_timeout_s if deployed else None,
        node_wait_s=scn.deployment.wait_for_nodes_s,
        # A SuperNode pulls its messages every 3 s when idle: a 0.25 s step costs little.
        max_poll_s=0.25 if deployed else POLL_S,
        local_data=scn.deployment.client_data == "local" if deployed else None,
    )


def build_server_app(
    scn: Scenario,
    fed: Federation,
    world: World,
    outcome: ServerOutcome,
    on_round: RoundHook | None = None,
    *,
    stop: threading.Event | None = None,
    on_participation: ParticipationHook | None = None,
    on_checkpoint: CheckpointHook | None = None,
    resume: Snapshot | None = None,
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome.result = build_coordinator(
                scn, fed, world, on_round, stop, on_participation, on_checkpoint, resume
            ).run(grid)
        except BaseException as exc:  # re-raised by the engine after the runtime stops
            outcome.error = exc

    return app
