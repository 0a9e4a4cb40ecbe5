"""The ``[client]`` table's common keys and the client-behaviour registry.

A client behaviour is what a simulated (or deployed) client does with a task: honest
local SGD (``sgd``), and later DP-SGD, attackers, SCAFFOLD-like clients. Each is a
registered parameter class selected by ``client.behaviour``; its methods live with the
behaviours themselves (``clients.behaviour``). The keys below are the local-training
hyper-parameters every behaviour reads, and the engine reads too (the virtual clock
counts ``epochs`` and ``batch_size``; q-FedAvg needs ``lr``).
"""

from __future__ import annotations

from typing import ClassVar

from flwr.app import ConfigRecord, Message
from pydantic import Field

from fedsim.registry import Registry
from fedsim.sections import Section


class ClientParams(Section):
    #: Whether the behaviour may keep a persistent state (``ClientTask.state``) between
    #: rounds. A checkpoint under Flower's runtime cannot save such states (the runtime
    #: keeps them), so it refuses such a behaviour; a plug-in that does not say may.
    keeps_state: ClassVar[bool] = True
    #: Whether the behaviour trains with record-level DP-SGD when the scenario asks for
    #: it (``privacy.dp.mode = "sample"``, handed over in ``ClientTask.dp``).
    dp_sgd: ClassVar[bool] = False

    behaviour: str = Field(description="Registered client behaviour (what a client does).")
    epochs: int = Field(1, ge=1, description="Local epochs per round (E).")
    batch_size: int = Field(32, ge=1, description="Local minibatch size (B).")
    lr: float = Field(0.05, gt=0, description="Local SGD learning rate (eta).")
    momentum: float = Field(0.0, ge=0, lt=1, description="Local SGD momentum.")
    weight_decay: float = Field(0.0, ge=0, description="Local SGD L2 weight decay.")
    mu: float = Field(
        0.0,
        ge=0,
        description="FedProx proximal term mu for any strategy; with strategy 'fedprox' "
        "set strategy.proximal_mu instead (the server sends it).",
    )
    eval_batch_size: int = Field(256, ge=1, description="Batch size for client-side evaluation.")


# Config keys the coordinator adds to a client's training instruction from its plan.
MAX_STEPS_KEY = "max-steps"  # a straggler's partial local work
DROPOUT_KEY = "fedsim-dropout"  # the plan has this client drop out: its ClientApp raises


def instruction_config(msg: Message) -> ConfigRecord:
    """The ConfigRecord of a client's instruction (empty if it has none)."""
    # (not ``content.config_records``: Flower builds and checks a new view of the
    # content's records on every call, 6 µs where this takes 0.2)
    rec = msg.content.get("config")
    return rec if isinstance(rec, ConfigRecord) else ConfigRecord()


def round_of(config: ConfigRecord) -> int:
    """The round an instruction's config belongs to (0 if it does not say)."""
    return int(config.get("server-round", 0))  # type: ignore[arg-type]


CLIENTS: Registry[type[ClientParams]] = Registry("client behaviour", key="behaviour", default="sgd")
