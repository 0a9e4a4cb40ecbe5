"""scikit-learn's bundled handwritten digits (8x8, 1,797 images), offline.

The UCI "Optical Recognition of Handwritten Digits" test set as shipped by
``sklearn.datasets.load_digits``: 16 grey levels per pixel, scaled here to [0, 1].
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field
from sklearn.datasets import load_digits

from fedsim.data.federation import (
    DATASETS,
    Federation,
    PartitionedData,
    build_federation,
    stratified_split,
)
from fedsim.rng import np_rng


@DATASETS.register("digits")
class DigitsData(PartitionedData):
    """sklearn digits: a stratified server test split; the rest is partitioned."""

    dataset: Literal["digits"] = Field(
        "digits", description="Dataset name: scikit-learn's bundled 8x8 digits."
    )
    num_clients: int = Field(20, ge=1, description="Number of clients sharing the pool.")
    test_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="Fraction of the 1,797 images held by the server as a stratified "
        "centralised test split; the partition covers the rest.",
    )

    def load(self, *, seed: int) -> Federation:
        """Load, scale to [0, 1], draw the server split, partition, split locally.

        Randomness: ``np_rng(seed, "data.server_test")`` for the server split, then as
        :func:`fedsim.data.federation.build_federation`.
        """
        bunch = load_digits()
        x = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None, :, :]
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
            num_classes=10,
            seed=seed,
        )
