"""The ``[strategy]`` table's common keys and the strategy registry.

The engine needs only this contract: a registered parameter class (selected by ``name``)
whose ``build`` returns a Flower ``flwr.serverapp.strategy.Strategy``. The algorithms
themselves are registrations in the ``strategies`` package or in a user's plug-in.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from fedsim.registry import Registry
from fedsim.sections import Section

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy


class StrategyParams(Section):
    """Parameters common to every strategy; subclasses add the algorithm's own."""

    # Whether the aggregate depends on the client replies only through their
    # "num-examples"-weighted mean (possibly followed by a server-side optimiser step
    # that uses nothing else from the replies). Such strategies can aggregate a stream
    # of replies with a running weighted sum. False for order-statistic / selection
    # rules (median, trimmed mean, Krum family) and for q-FedAvg; a plug-in strategy
    # that does not say is shown every reply.
    weighted_mean: ClassVar[bool] = False
    # Whether the strategy's training never depends on its own evaluation results, so
    # fedsim's engine may send round r + 1's training ahead of round r's evaluation
    # (configure_train(r + 1) then comes before aggregate_evaluate(r)). True for every
    # Flower strategy; a plug-in that does not say gets the plain order.
    overlaps_evaluation: ClassVar[bool] = False

    name: str = Field(description="Registered name of the aggregation strategy.")
    clients_per_round: int | None = Field(
        None,
        ge=1,
        description="Clients sampled for training each round; omit to use every client.",
    )
    evaluate_clients_per_round: int | None = Field(
        None,
        ge=0,
        description=(
            "Clients sampled for federated (client-side) evaluation each round; omit to "
            "use clients_per_round; 0 turns federated evaluation off."
        ),
    )
    evaluate_trained_clients: bool = Field(
        False,
        description=(
            "Evaluate on exactly the clients that trained this round (after training), "
            "instead of sampling evaluate_clients_per_round clients."
        ),
    )
    centralized_evaluation: bool = Field(
        True,
        description="Evaluate the global model on the server's test split every round.",
    )

    @abstractmethod
    def build(self, *, client_lr: float) -> Strategy:
        """Return a fresh Flower strategy configured with these parameters.

        ``client_lr`` is the clients' local learning rate, for strategies whose server
        step needs it (q-FedAvg's Lipschitz estimate ``L = 1 / lr``).
        """

    def check(self, *, cohort_size: int) -> list[tuple[str, str]]:
        """Problems with these parameters when ``cohort_size`` clients reply per round.

        Returns ``(key path, message)`` pairs, e.g.
        ``("strategy.num_malicious_nodes", "...")``; an empty list means no problem.
        """
        return []


STRATEGIES: Registry[type[StrategyParams]] = Registry("strategy", key="name", default="fedavg")
