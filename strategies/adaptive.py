"""Adaptive server optimisers FedAdam, FedYogi and FedAdagrad (Flower implementations).

Paper: Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive
Federated Optimization", ICLR 2021, arXiv:2003.00295.

Each round the server forms the pseudo-gradient Delta_t = avg_k(w^k) - w_t (the
"num-examples"-weighted mean of the client models minus the current global model),
m_t = beta_1 m_{t-1} + (1 - beta_1) Delta_t, and a second-moment estimate v_t:

- Adagrad: v_t = v_{t-1} + Delta_t^2
- Yogi:    v_t = v_{t-1} - (1 - beta_2) Delta_t^2 sign(v_{t-1} - Delta_t^2)
- Adam:    v_t = beta_2 v_{t-1} + (1 - beta_2) Delta_t^2

then w_{t+1} = w_t + eta m_t / (sqrt(v_t) + tau). Flower starts m and v at zero, uses
beta_1 = 0 for Adagrad, and for Adam scales eta by the bias correction
sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1)) with t the server round.

Assumption: ``configure_train`` is called before ``aggregate_train`` each round (the
strategy records w_t there). Flower stores ``eta_l`` for its summary only; the clients'
actual learning rate comes from the client training settings.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedYogi, Strategy
from pydantic import Field

from .base import SAMPLE_ALL_SHOWN_NODES, STRATEGIES, FlowerStrategyParams


def _eta(default: float) -> Any:
    return Field(default, gt=0.0, description="Server learning rate eta.")


def _eta_l(default: float) -> Any:
    return Field(
        default,
        gt=0.0,
        description=(
            "Client learning rate eta_l as recorded by Flower (logged only; it does not "
            "change the aggregation or the clients' training)."
        ),
    )


def _beta_1(default: float) -> Any:
    return Field(default, ge=0.0, lt=1.0, description="First-moment (momentum) decay beta_1.")


def _beta_2(default: float) -> Any:
    return Field(default, ge=0.0, lt=1.0, description="Second-moment decay beta_2.")


def _tau(default: float) -> Any:
    return Field(
        default,
        gt=0.0,
        description="Adaptivity tau added to sqrt(v_t); smaller is more adaptive.",
    )


@STRATEGIES.register("fedadam")
class FedAdamParams(FlowerStrategyParams):
    """FedAdam (Reddi et al. 2021, arXiv:2003.00295): Adam on the server."""

    weighted_mean: ClassVar[bool] = True

    name: Literal["fedadam"] = Field("fedadam", description="FedAvg with a server Adam step.")
    eta: float = _eta(1e-1)
    eta_l: float = _eta_l(1e-1)
    beta_1: float = _beta_1(0.9)
    beta_2: float = _beta_2(0.99)
    tau: float = _tau(1e-3)

    def build(self, *, client_lr: float) -> Strategy:
        return FedAdam(
            **SAMPLE_ALL_SHOWN_NODES,
            eta=self.eta,
            eta_l=self.eta_l,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            tau=self.tau,
        )


@STRATEGIES.register("fedyogi")
class FedYogiParams(FlowerStrategyParams):
    """FedYogi (Reddi et al. 2021, arXiv:2003.00295): Yogi on the server."""

    weighted_mean: ClassVar[bool] = True

    name: Literal["fedyogi"] = Field("fedyogi", description="FedAvg with a server Yogi step.")
    eta: float = _eta(1e-2)
    eta_l: float = _eta_l(0.0316)
    beta_1: float = _beta_1(0.9)
    beta_2: float = _beta_2(0.99)
    tau: float = _tau(1e-3)

    def build(self, *, client_lr: float) -> Strategy:
        return FedYogi(
            **SAMPLE_ALL_SHOWN_NODES,
            eta=self.eta,
            eta_l=self.eta_l,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            tau=self.tau,
        )


@STRATEGIES.register("fedadagrad")
class FedAdagradParams(FlowerStrategyParams):
    """FedAdagrad (Reddi et al. 2021, arXiv:2003.00295): Adagrad on the server."""

    weighted_mean: ClassVar[bool] = True

    name: Literal["fedadagrad"] = Field(
        "fedadagrad", description="FedAvg with a server Adagrad step."
    )
    eta: float = _eta(1e-1)
    eta_l: float = _eta_l(1e-1)
    tau: float = _tau(1e-3)

    def build(self, *, client_lr: float) -> Strategy:
        return FedAdagrad(**SAMPLE_ALL_SHOWN_NODES, eta=self.eta, eta_l=self.eta_l, tau=self.tau)
