"""The Flower ``ClientApp`` of a scenario: local torch training and held-out evaluation.

The app closes over the resolved scenario as a JSON string only; datasets, shards and
the model are built once per worker process (``_env``) and reused for every virtual
client that worker hosts, so nothing is pickled per client. The same app runs under
fedsim's Ray grid, Flower's simulation runtime, and on real SuperNodes
(``node_config`` must then carry ``partition-id``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.training import evaluate_model, pick_device, train_local
from fedsim.arrays import to_array, torch_state
from fedsim.data import AnyFederation, load_federation
from fedsim.models import build_model
from fedsim.rng import torch_generator

PARTITION_ID = "partition-id"


@dataclass
class _Env:
    scenario: Any  # fedsim.scenario.Scenario (imported lazily: it imports this package)
    federation: AnyFederation
    model: torch.nn.Module
    device: torch.device
    dropout: Any = None  # fedsim.world.system.DropoutModel
    last_record: ArrayRecord | None = None
    last_state: dict[str, torch.Tensor] | None = None
    holds: ArrayRecord | None = None  # the record env.model's weights equal, if unchanged


@functools.lru_cache(maxsize=2)
def _env(spec_json: str) -> _Env:
    from fedsim.scenario import Scenario

    scn = Scenario.model_validate(json.loads(spec_json))
    torch.set_num_threads(scn.simulation.torch_threads)
    fed = load_federation(scn.data, seed=scn.run.seed)
    device = pick_device(scn.simulation.client_resources.gpus)
    # Seeded only so that building it never draws from the global torch RNG.
    model = build_model(
        scn.model, input_shape=fed.input_shape, num_classes=fed.num_classes, seed=scn.run.seed
    )
    from fedsim.world.system import DropoutModel

    dropout = DropoutModel(scn.churn.dropout, num_clients=scn.num_clients, seed=scn.run.seed)
    return _Env(scn, fed, model.to(device), device, dropout if dropout.active else None)


class SimulatedDropout(RuntimeError):
    """The scenario's churn.dropout made this client vanish before replying."""


def _client_id(context: Context) -> int:
    try:
        return int(context.node_config[PARTITION_ID])
    except KeyError:
        raise RuntimeError(
            f"node_config has no '{PARTITION_ID}': start the SuperNode with "
            f"--node-config 'partition-id=N num-partitions=M'"
        ) from None


def _load_arrays(env: _Env, msg: Message) -> None:
    record = msg.content.array_records["arrays"]
    # Every message of a batch carries the same ArrayRecord object (the global model):
    # deserialise it once per batch, not once per client.
    if env.last_record is not record:
        env.last_state = torch_state(record)
        env.last_record = record
    if env.holds is not record:  # evaluation leaves the weights as they were loaded
        env.model.load_state_dict(env.last_state)
        env.holds = record


def to_array_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: to_array(v.detach().cpu().numpy()) for k, v in state.items()})


def build_client_app(spec_json: str) -> ClientApp:
    """A ClientApp for the scenario given as ``Scenario.model_dump_json()``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        env = _env(spec_json)
        scn, fed = env.scenario, env.federation
        cid = _client_id(context)
        config = msg.content.config_records.get("config", ConfigRecord())
        server_round = int(config.get("server-round", 0))
        if env.dropout is not None and env.dropout.dropped(cid, server_round):
            raise SimulatedDropout(
                f"client {cid} dropped out in round {server_round} (churn.dropout)"
            )
        mu = float(config.get("proximal-mu", scn.client.mu))
        max_steps = config.get("max-steps")  # a straggler's partial work (coordinator policy)
        _load_arrays(env, msg)
        env.holds = None  # training changes the weights
        x, y = fed.train_data(cid)
        c = scn.client
        res = train_local(
            env.model,
            x,
            y,
            epochs=c.epochs,
            batch_size=c.batch_size,
            lr=c.lr,
            momentum=c.momentum,
            weight_decay=c.weight_decay,
            mu=mu,
            generator=torch_generator(scn.run.seed, "batch", server_round, cid),
            device=env.device,
            max_steps=None if max_steps is None else int(max_steps),
        )
        content = RecordDict(
            {
                "arrays": to_array_record(env.model.state_dict()),
                "metrics": MetricRecord(
                    {"num-examples": res.num_examples, "train_loss": res.train_loss}
                ),
            }
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        env = _env(spec_json)
        fed = env.federation
        cid = _client_id(context)
        _load_arrays(env, msg)
        x, y = fed.test_data(cid)
        res = evaluate_model(
            env.model,
            x,
            y,
            batch_size=env.scenario.client.eval_batch_size,
            device=env.device,
        )
        metrics = MetricRecord(
            {"num-examples": res.num_examples, "eval_loss": res.loss, "eval_accuracy": res.accuracy}
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        # Lets a coordinator map Flower node ids to fedsim client (partition) ids.
        info = MetricRecord({PARTITION_ID: _client_id(context)})
        return Message(RecordDict({"info": info}), reply_to=msg)

    return app
