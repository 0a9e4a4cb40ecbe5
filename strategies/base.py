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

from types import MappingProxyType
from typing import Any, ClassVar

from fedsim.strategy_params import STRATEGIES, StrategyParams

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


class FlowerStrategyParams(StrategyParams):
    """Base of the built-in strategies: Flower's own, none of which reads its evaluation
    results when it trains, so evaluation may overlap the next round's training."""

    overlaps_evaluation: ClassVar[bool] = True


__all__ = ["SAMPLE_ALL_SHOWN_NODES", "STRATEGIES", "FlowerStrategyParams", "StrategyParams"]
