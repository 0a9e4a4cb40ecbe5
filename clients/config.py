"""The ``[client]`` table: how each simulated client trains locally."""

from __future__ import annotations

from pydantic import Field

from fedsim.sections import Section


class ClientSection(Section):
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
