"""Common parameters of every aggregation strategy and the strategy registry.

A scenario's ``[strategy]`` table is validated into one ``StrategyParams`` subclass,
chosen by its ``name`` key; ``build()`` turns it into a Flower
``flwr.serverapp.strategy.Strategy``.

Assumption shared by every strategy here: fedsim's coordinator samples the cohort
itself (with its own seeded RNG), shows the strategy a grid whose ``get_node_ids()``
returns exactly that cohort, and sorts replies by client id before aggregation. So every
built strategy is told to take all nodes it is shown and never to wait for more
(``SAMPLE_ALL_SHOWN_NODES``). With those values Flower's ``FedAvg.configure_train`` (which
every class here inherits) computes ``int(n * 1.0) = n`` nodes, ``sample_nodes`` waits for
``max(0, n) = n`` nodes (already there), and the ``fraction_* == 0.0`` "skip" branches
never trigger, so it returns exactly one message per shown node.
"""

from __future__ import annotations

from abc import abstractmethod
from types import MappingProxyType
from typing import Any, ClassVar

from flwr.serverapp.strategy import Strategy
from pydantic import Field

from fedsim.registry import Registry
from fedsim.sections import Section

# Keyword arguments given to every Flower strategy constructor: take every node shown.
SAMPLE_ALL_SHOWN_NODES: MappingProxyType[str, Any] = MappingProxyType(
    {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": 0,
        "min_evaluate_nodes": 0,
        "min_available_nodes": 0,
    }
)


class StrategyParams(Section):
    """Parameters common to every strategy; subclasses add the algorithm's own."""

    # Whether the aggregate depends on the client replies only through their
    # "num-examples"-weighted mean (possibly followed by a server-side optimiser step
    # that uses nothing else from the replies). Such strategies can aggregate a stream
    # of replies with a running weighted sum. False for order-statistic / selection
    # rules (median, trimmed mean, Krum family) and for q-FedAvg.
    weighted_mean: ClassVar[bool]

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


STRATEGIES: Registry[type[StrategyParams]] = Registry("strategy")
