"""Client behaviours: what a client does with a training or evaluation task.

A behaviour is a ``[client]`` parameter class registered in ``fedsim.client_params.CLIENTS``
under the name ``client.behaviour`` selects. The ClientApp (``clients.app``) loads the
global model into a torch module, hands the behaviour a :class:`ClientTask`, and turns
what it returns into the Flower reply, so a behaviour is plain torch: honest local SGD
(``sgd``, below), and next to it attackers, DP-SGD or SCAFFOLD-like clients.

A behaviour trains ``task.model`` in place (it arrives holding the global weights
``w_t``) and returns a :class:`Outcome`; the reply carries the trained weights.
``task.state`` is the client's own persistent ``RecordDict``: what a behaviour stores
there comes back the next time this client is given a task (control variates, a
privacy ledger); leave it untouched when there is nothing to keep.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from pydantic import Field

from clients.dpsgd import train_dpsgd
from clients.training import evaluate_model, train_local
from fedsim.client_params import CLIENTS, MAX_STEPS_KEY, ClientParams
from fedsim.privacy.config import DP_STEPS, SampleDp

__all__ = ["Behaviour", "ClientTask", "Outcome", "SgdClient"]


@dataclass
class ClientTask:
    """One client's task in one round, as a behaviour sees it."""

    cid: int
    server_round: int
    config: ConfigRecord  # what the strategy sent (e.g. proximal-mu, max-steps)
    model: torch.nn.Module  # holds the global model w_t on arrival
    device: torch.device
    x: np.ndarray  # this client's examples for the task (train or held-out split)
    y: np.ndarray
    # Seeded for (run seed, round, client): batch order and any other draw (training only).
    generator: torch.Generator | None = None
    state: RecordDict = field(default_factory=RecordDict)  # persists across rounds
    # Record-level DP-SGD (privacy.dp.mode = "sample"): the [privacy.dp] table, and the
    # seeded generator of its noise; None without it.
    dp: SampleDp | None = None
    noise_generator: torch.Generator | None = None


@dataclass
class Outcome:
    """What a behaviour did: the example count (the aggregation weight) and metrics.

    ``arrays``, when given, is sent instead of the trained model's weights (a client that
    replies something else: an attacker, or a test of reply validation); every engine
    validates a reply before it is used (``fedsim.engine.validation``).
    """

    num_examples: int
    metrics: dict[str, float | int] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] | None = None


class Behaviour(ClientParams):
    """Base of registered client behaviours: subclasses implement ``train``; evaluation
    defaults to loss and accuracy of the received model on the held-out split."""

    @abstractmethod
    def train(self, task: ClientTask) -> Outcome:
        """Train ``task.model`` in place on ``task.x``/``task.y``."""

    def evaluate(self, task: ClientTask) -> Outcome:
        res = evaluate_model(
            task.model, task.x, task.y, batch_size=self.eval_batch_size, device=task.device
        )
        return Outcome(res.num_examples, {"eval_loss": res.loss, "eval_accuracy": res.accuracy})


@CLIENTS.register("sgd")
class SgdClient(Behaviour):
    """Honest local minibatch SGD (FedAvg's ClientUpdate; FedProx's with mu > 0)."""

    keeps_state: ClassVar[bool] = False
    dp_sgd: ClassVar[bool] = True

    behaviour: Literal["sgd"] = Field(
        "sgd", description="Client behaviour: 'sgd' is honest local minibatch SGD."
    )

    def train(self, task: ClientTask) -> Outcome:
        mu = float(task.config.get("proximal-mu", self.mu))
        max_steps = task.config.get(MAX_STEPS_KEY)  # a straggler's partial work
        common = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "generator": task.generator,
            "device": task.device,
            "max_steps": None if max_steps is None else int(max_steps),  # type: ignore[arg-type]
        }
        if task.dp is None:
            res = train_local(task.model, task.x, task.y, mu=mu, **common)  # type: ignore[arg-type]
            return Outcome(res.num_examples, {"train_loss": res.train_loss})
        if mu > 0:  # (refused by the scenario's validation; never silently dropped)
            raise ValueError("DP-SGD has no proximal term: FedProx's mu must be 0")
        res = train_dpsgd(
            task.model,
            task.x,
            task.y,
            clip_norm=task.dp.clip_norm,
            noise_multiplier=task.dp.noise_multiplier,  # type: ignore[arg-type]
            noise_generator=task.noise_generator,  # type: ignore[arg-type]
            **common,  # type: ignore[arg-type]
        )
        return Outcome(res.num_examples, {"train_loss": res.train_loss, DP_STEPS: res.steps})
