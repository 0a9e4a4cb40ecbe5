"""Aggregation strategies: registry name -> Flower strategy, configured from ``[strategy]``.

``STRATEGIES.get(name)`` returns the parameter class registered under ``name``;
``StrategySpec`` is the union (on ``name``, generated from the registry) a scenario's ``[strategy]``
table validates into; ``params.build(client_lr=...)`` returns the Flower strategy and
``params.check(cohort_size=...)`` lists impossible settings for a cohort size.
"""

from __future__ import annotations

from typing import Annotated

from fedsim.registry import Variants

from .adaptive import FedAdagradParams, FedAdamParams, FedYogiParams
from .averaging import FedAvgMParams, FedAvgParams, FedProxParams, QFedAvgParams
from .base import SAMPLE_ALL_SHOWN_NODES, STRATEGIES, FlowerStrategyParams, StrategyParams
from .robust import (
    BulyanParams,
    FedMedianParams,
    FedTrimmedAvgParams,
    KrumParams,
    MultiKrumParams,
)

# The [strategy] table: a union of every registered strategy, built from the registry.
StrategySpec = Annotated[StrategyParams, Variants(STRATEGIES)]

__all__ = [
    "SAMPLE_ALL_SHOWN_NODES",
    "STRATEGIES",
    "BulyanParams",
    "FedAdagradParams",
    "FedAdamParams",
    "FedAvgMParams",
    "FedAvgParams",
    "FedMedianParams",
    "FedProxParams",
    "FedTrimmedAvgParams",
    "FedYogiParams",
    "FlowerStrategyParams",
    "KrumParams",
    "MultiKrumParams",
    "QFedAvgParams",
    "StrategyParams",
    "StrategySpec",
]
