"""A fedsim plug-in: one file that adds a strategy, a model and a dataset.

Name it in a scenario (``run.plugins = ["examples/plugins/my_plugin.py"]``) and the
names registered here work like built-ins: in ``[strategy]``, ``[model]`` and
``[data]``, in ``fedsim validate`` and ``fedsim schema``, on both engines and in every
Ray worker. See README.md, "Bring your own strategy / model / data".
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from pydantic import Field
from sklearn.datasets import load_breast_cancer
from torch import nn

from fedsim.data import DATASETS
from fedsim.data.federation import PartitionedData, build_federation, stratified_split
from fedsim.models import MODELS, ModelParams
from fedsim.rng import np_rng
from fedsim.strategy_params import STRATEGIES, StrategyParams
from strategies import SAMPLE_ALL_SHOWN_NODES

# ------------------------------------------------------------------ a Flower strategy


class ServerLrFedAvg(FedAvg):
    """FedAvg with a server learning rate: w_{t+1} = w_t + eta_g * (avg_k w^k - w_t)."""

    def __init__(self, *, server_lr: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.server_lr = server_lr
        self._current: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        self._current = arrays  # w_t, for the server step
        return list(super().configure_train(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        avg, metrics = super().aggregate_train(server_round, replies)
        if avg is None or self._current is None:
            return avg, metrics
        out = {}
        for key, cur in self._current.items():
            w = cur.numpy()
            out[key] = Array((w + self.server_lr * (avg[key].numpy() - w)).astype(w.dtype))
        return ArrayRecord(out), metrics


@STRATEGIES.register("fedavg_slr")
class ServerLrParams(StrategyParams):
    """FedAvg with a server learning rate eta_g (1 is FedAvg)."""

    # The aggregate uses the replies only through their weighted mean: fedsim's workers
    # may pre-fold it, and the strategy is handed that mean as one reply.
    weighted_mean: ClassVar[bool] = True
    # Its training never reads its evaluation results: evaluation may overlap training.
    overlaps_evaluation: ClassVar[bool] = True

    name: Literal["fedavg_slr"] = Field("fedavg_slr", description="FedAvg with a server lr.")
    server_lr: float = Field(1.0, gt=0, description="Server learning rate eta_g.")

    def build(self, *, client_lr: float) -> Strategy:
        return ServerLrFedAvg(server_lr=self.server_lr, **SAMPLE_ALL_SHOWN_NODES)


# ------------------------------------------------------------------ a torch model


@MODELS.register("norm_mlp")
class NormMlp(ModelParams):
    """One hidden layer with LayerNorm: input -> hidden -> LayerNorm -> ReLU -> logits."""

    name: Literal["norm_mlp"] = Field("norm_mlp", description="MLP with a LayerNorm.")
    hidden: int = Field(32, ge=1, description="Hidden units.")

    def build(self, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(int(np.prod(input_shape)), self.hidden),
            nn.LayerNorm(self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, num_classes),
        )


# ------------------------------------------------------------------ a dataset


@DATASETS.register("breast_cancer")
class BreastCancerData(PartitionedData):
    """scikit-learn's bundled Wisconsin breast cancer data (569 x 30, 2 classes)."""

    dataset: Literal["breast_cancer"] = Field("breast_cancer", description="Breast cancer.")
    num_clients: int = Field(10, ge=1, description="Number of clients sharing the pool.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Server test split.")

    def load(self, *, seed: int):
        bunch = load_breast_cancer()
        x = np.asarray(bunch.data, dtype=np.float32)
        x = (x - x.mean(0)) / x.std(0)  # standardised features
        y = np.asarray(bunch.target, dtype=np.int64)
        pool, held = stratified_split(
            y, fraction=self.test_fraction, rng=np_rng(seed, "data.server_test")
        )
        return build_federation(
            x[pool],
            y[pool],
            x[held],
            y[held],
            partition=self.partition,
            num_clients=self.num_clients,
            client_test_fraction=self.client_test_fraction,
            num_classes=2,
            seed=seed,
        )
