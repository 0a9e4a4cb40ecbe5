"""Averaging strategies: FedAvg, FedAvgM, FedProx and q-FedAvg (Flower implementations).

Papers:

- FedAvg: McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient
  Learning of Deep Networks from Decentralized Data", AISTATS 2017, arXiv:1602.05629.
- FedAvgM: Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution
  for Federated Visual Classification", 2019, arXiv:1909.06335.
- FedProx: Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in
  Heterogeneous Networks", MLSys 2020, arXiv:1812.06127.
- q-FedAvg: Li, Sanjabi, Beirami, Smith, "Fair Resource Allocation in Federated
  Learning", ICLR 2020, arXiv:1905.10497.

Assumptions: each client replies with one ArrayRecord (its new local model, under
"arrays") and one MetricRecord holding "num-examples" (the averaging weight) and
"train_loss" (q-FedAvg's F_k). FedAvgM and q-FedAvg keep the current global model
from ``configure_train``, so they must see ``configure_train`` before ``aggregate_train``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from flwr.serverapp.strategy import FedAvg, FedAvgM, FedProx, QFedAvg, Strategy
from pydantic import Field

from .base import SAMPLE_ALL_SHOWN_NODES, STRATEGIES, FlowerStrategyParams


@STRATEGIES.register("fedavg")
class FedAvgParams(FlowerStrategyParams):
    """FedAvg (McMahan et al. 2017, arXiv:1602.05629).

    The new global model is the mean of the clients' models weighted by their number
    of training examples n_k: w_{t+1} = sum_k (n_k / n) w_{t+1}^k.
    """

    weighted_mean: ClassVar[bool] = True

    name: Literal["fedavg"] = Field("fedavg", description="Federated Averaging.")

    def build(self, *, client_lr: float) -> Strategy:
        return FedAvg(**SAMPLE_ALL_SHOWN_NODES)


@STRATEGIES.register("fedavgm")
class FedAvgMParams(FlowerStrategyParams):
    """FedAvgM (Hsu et al. 2019, arXiv:1909.06335): FedAvg plus server momentum.

    With pseudo-gradient g_t = w_t - avg_k(w_{t+1}^k): v_t = beta v_{t-1} + g_t (v_1 = g_1),
    w_{t+1} = w_t - server_learning_rate * v_t (Flower follows torch.optim.SGD).
    """

    weighted_mean: ClassVar[bool] = True

    name: Literal["fedavgm"] = Field("fedavgm", description="FedAvg with server momentum.")
    server_learning_rate: float = Field(
        1.0,
        gt=0.0,
        description="Server learning rate applied to the momentum pseudo-gradient.",
    )
    server_momentum: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Server momentum beta (Hsu et al.'s beta); 0 disables momentum.",
    )

    def build(self, *, client_lr: float) -> Strategy:
        return FedAvgM(
            **SAMPLE_ALL_SHOWN_NODES,
            server_learning_rate=self.server_learning_rate,
            server_momentum=self.server_momentum,
        )


@STRATEGIES.register("fedprox")
class FedProxParams(FlowerStrategyParams):
    """FedProx (Li et al. 2020, arXiv:1812.06127).

    Server side identical to FedAvg; each client minimises
    F_k(w) + (mu / 2) ||w - w_t||^2. Flower sends mu to clients in the train
    ConfigRecord under "proximal-mu"; the client behaviour must add the term.
    """

    weighted_mean: ClassVar[bool] = True

    name: Literal["fedprox"] = Field("fedprox", description="FedAvg with a proximal term.")
    proximal_mu: float = Field(
        0.0,
        ge=0.0,
        description=("Proximal term weight mu, sent to clients as 'proximal-mu'; 0 equals FedAvg."),
    )

    def build(self, *, client_lr: float) -> Strategy:
        return FedProx(**SAMPLE_ALL_SHOWN_NODES, proximal_mu=self.proximal_mu)


@STRATEGIES.register("qfedavg")
class QFedAvgParams(FlowerStrategyParams):
    """q-FedAvg (Li et al. 2020, "Fair Resource Allocation in FL", arXiv:1905.10497).

    With L = 1 / client learning rate, Delta w_k = L (w_t - w_k),
    Delta_k = F_k^q Delta w_k and h_k = q F_k^(q-1) ||Delta w_k||^2 + L F_k^q:
    w_{t+1} = w_t - sum_k Delta_k / sum_k h_k, F_k being the client's "train_loss".

    ``weighted_mean`` is False: the coefficient of each client's update depends on its
    loss and on the norms of all updates (through sum_k h_k), and "num-examples" is not
    used, so the aggregate is not a weighted mean of the updates. (It is still two
    running sums, sum_k Delta_k and sum_k h_k, should streaming ever want it.)
    """

    weighted_mean: ClassVar[bool] = False

    name: Literal["qfedavg"] = Field("qfedavg", description="q-Fair Federated Averaging.")
    q: float = Field(
        0.1,
        ge=0.0,
        description="Fairness parameter q; 0 is FedAvg-like, larger q favours high-loss clients.",
    )
    client_learning_rate: float | None = Field(
        None,
        gt=0.0,
        description=(
            "Client learning rate used to estimate the Lipschitz constant L = 1 / lr; "
            "omit to use the clients' actual learning rate."
        ),
    )

    def build(self, *, client_lr: float) -> Strategy:
        lr = self.client_learning_rate if self.client_learning_rate is not None else client_lr
        if not lr > 0.0:
            raise ValueError(f"qfedavg needs a positive client learning rate, got {lr}")
        return QFedAvg(**SAMPLE_ALL_SHOWN_NODES, client_learning_rate=lr, q=self.q)
