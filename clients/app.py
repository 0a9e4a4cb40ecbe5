"""The Flower ``ClientApp`` of a scenario: local torch training and held-out evaluation.

The app closes over the resolved scenario as a JSON string only; datasets, shards and
the model are built once per worker process (``_env``) and reused for every virtual
client that worker hosts, so nothing is pickled per client. The same app runs under
fedsim's Ray grid, Flower's simulation runtime, and on real SuperNodes
(``node_config`` must then carry ``partition-id``, and ``data-dir`` when the node
trains on a folder of its own instead of that partition: ``fedsim.data.local``).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.behaviour import Behaviour, ClientTask
from clients.training import pick_device
from fedsim.arrays import record_of, to_array, torch_state
from fedsim.attack_params import AttackParams
from fedsim.client_params import DROPOUT_KEY, instruction_config, round_of
from fedsim.data import AnyFederation, load_federation
from fedsim.data.local import LocalData, load_local_data
from fedsim.models import build_model
from fedsim.privacy.config import LocalDp, SampleDp
from fedsim.privacy.mechanisms import CLIPPED, local_dp
from fedsim.rng import np_rng, torch_generator
from fedsim.scenario import Scenario, scenario_from_json

PARTITION_ID = "partition-id"
DATA_DIR = "data-dir"  # a node's own data folder (fedsim node --data)
LOCAL_DATA = "local-data"  # (the query reply: 1 if the node trains on its own folder)


@dataclass
class _Env:
    scenario: Scenario
    federation: AnyFederation
    model: torch.nn.Module
    device: torch.device
    behaviour: Behaviour  # the scenario's [client] table, a registered behaviour
    attackers: frozenset[int]  # clients that run the scenario's local [attack]
    last_record: ArrayRecord | None = None
    last_state: dict[str, torch.Tensor] | None = None
    holds: ArrayRecord | None = None  # the record env.model's weights equal, if unchanged


@functools.lru_cache(maxsize=2)
def _env(spec_json: str) -> _Env:
    scn = scenario_from_json(spec_json)  # imports the scenario's plug-ins first
    torch.set_num_threads(scn.simulation.torch_threads)
    fed = load_federation(scn.data, seed=scn.run.seed)
    device = pick_device(scn.simulation.client_resources.gpus)
    # Seeded only so that building it never draws from the global torch RNG.
    model = build_model(
        scn.model, input_shape=fed.input_shape, num_classes=fed.num_classes, seed=scn.run.seed
    )
    if not isinstance(scn.client, Behaviour):
        raise TypeError(
            f"client behaviour '{scn.client.behaviour}' is not a clients.behaviour.Behaviour"
        )
    attack = scn.attack
    # Omniscient attacks are crafted at the coordinator: their clients train honestly.
    local = attack.active and not type(attack).omniscient
    attackers = frozenset(attack.attackers(fed.num_clients, scn.run.seed).tolist() if local else ())
    return _Env(scn, fed, model.to(device), device, scn.client, attackers)


class SimulatedDropout(RuntimeError):
    """The coordinator's plan (churn.dropout) made this client vanish before replying."""


def _client_id(context: Context) -> int:
    try:
        return int(context.node_config[PARTITION_ID])
    except KeyError:
        raise RuntimeError(
            f"node_config has no '{PARTITION_ID}': start the SuperNode with "
            f"--node-config 'partition-id=N num-partitions=M'"
        ) from None


@functools.lru_cache(maxsize=4)
def _local(folder: str) -> LocalData:
    return load_local_data(folder)


def _client_data(env: _Env, context: Context, cid: int, *, train: bool) -> tuple:
    """(x, y) the client trains (or evaluates) on: its partition of the scenario's
    dataset, or the node's own data folder when its node_config names one."""
    folder = context.node_config.get(DATA_DIR)
    if not folder:
        fed = env.federation
        return fed.train_data(cid) if train else fed.test_data(cid)
    local = _local(str(folder))
    local.check(env.federation.input_shape, env.federation.num_classes)
    return (local.x, local.y) if train else (local.x_test, local.y_test)


def _load_arrays(env: _Env, msg: Message) -> None:
    record = msg.content.get("arrays")  # (not array_records: see instruction_config)
    if not isinstance(record, ArrayRecord):
        raise KeyError("the instruction carries no ArrayRecord 'arrays'")
    # Every message of a batch carries the same ArrayRecord object (the global model):
    # deserialise it once per batch, not once per client.
    if env.last_record is not record:
        env.last_state = torch_state(record)
        env.last_record = record
    if env.holds is not record:  # evaluation leaves the weights as they were loaded
        env.model.load_state_dict(env.last_state)
        env.holds = record


def to_array_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return record_of({k: to_array(v.detach().cpu().numpy()) for k, v in state.items()})


def _crafted(
    attack: AttackParams,
    w_t: dict[str, np.ndarray],
    trained: dict[str, torch.Tensor],
    rng: np.random.Generator,
) -> dict[str, np.ndarray] | None:
    """An attacker's reply arrays: ``w_t`` plus the update its attack crafts from the
    honest one (floating arrays; integer buffers as trained). None: the honest reply."""
    w = {k: v.detach().cpu().numpy() for k, v in trained.items()}
    floats = [k for k, a in w.items() if np.issubdtype(a.dtype, np.floating)]
    crafted = attack.craft({k: w[k] - w_t[k] for k in floats}, rng)
    if crafted is None:
        return None
    return {k: (w_t[k] + crafted[k]).astype(w_t[k].dtype) if k in crafted else w[k] for k in w}


def build_client_app(spec_json: str) -> ClientApp:
    """A ClientApp for the scenario given as ``Scenario.model_dump_json()``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        env = _env(spec_json)
        cid = _client_id(context)
        config = instruction_config(msg)
        server_round = round_of(config)
        if config.get(DROPOUT_KEY):
            raise SimulatedDropout(
                f"client {cid} dropped out in round {server_round} (churn.dropout)"
            )
        _load_arrays(env, msg)
        env.holds = None  # training changes the weights
        x, y = _client_data(env, context, cid, train=True)
        seed = env.scenario.run.seed
        attack = env.scenario.attack if cid in env.attackers else None
        w_t: dict[str, np.ndarray] = {}
        if attack is not None:
            x, y = attack.poison(x, y, env.federation.num_classes)
            w_t = {k: v.detach().cpu().numpy().copy() for k, v in env.model.state_dict().items()}
        task = ClientTask(
            cid,
            server_round,
            config,
            env.model,
            env.device,
            x,
            y,
            generator=torch_generator(seed, "batch", server_round, cid),
            state=context.state,
        )
        dp = env.scenario.privacy.dp
        if isinstance(dp, SampleDp):
            task.dp = dp
            task.noise_generator = torch_generator(seed, "dp-sgd-noise", server_round, cid)
        out = env.behaviour.train(task)
        if attack is not None and out.arrays is None:
            rng = np_rng(seed, "attack", server_round, cid)
            out.arrays = _crafted(attack, w_t, env.model.state_dict(), rng)
        metrics = {"num-examples": out.num_examples, **out.metrics}
        if isinstance(dp, LocalDp) and attack is None:  # (an attacker skips it)
            w = out.arrays
            if w is None:
                w = {k: v.detach().cpu().numpy() for k, v in env.model.state_dict().items()}
            w_t = {k: v.numpy() for k, v in env.last_state.items()}  # type: ignore[union-attr]
            out.arrays, clipped = local_dp(
                {k: np.asarray(v) for k, v in w.items()},
                w_t,
                clip_norm=dp.clip_norm,
                noise_multiplier=dp.noise_multiplier,  # type: ignore[arg-type]
                rng=np_rng(seed, "dp-local", server_round, cid),
            )
            metrics[CLIPPED] = float(clipped)
        if out.arrays is None:
            arrays = to_array_record(env.model.state_dict())
        else:
            arrays = record_of({k: to_array(np.asarray(v)) for k, v in out.arrays.items()})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        env = _env(spec_json)
        cid = _client_id(context)
        config = instruction_config(msg)
        _load_arrays(env, msg)
        x, y = _client_data(env, context, cid, train=False)
        server_round = round_of(config)
        # Evaluation reads the client's state but keeps no change to it: fedsim's engine
        # queues a round's evaluation behind the next round's training, so only training
        # may write it (the same on every engine).
        state = copy.deepcopy(context.state) if len(context.state) else RecordDict()
        task = ClientTask(cid, server_round, config, env.model, env.device, x, y, state=state)
        out = env.behaviour.evaluate(task)
        metrics = MetricRecord({"num-examples": out.num_examples, **out.metrics})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        # Lets a coordinator map Flower node ids to fedsim client (partition) ids.
        local = int(bool(context.node_config.get(DATA_DIR)))
        info = MetricRecord({PARTITION_ID: _client_id(context), LOCAL_DATA: local})
        return Message(RecordDict({"info": info}), reply_to=msg)

    return app
