"""Generated data: Gaussian class clusters drawn per client from the seed, on demand.

Nothing is stored per client: client ``k``'s examples are regenerated from
``np_rng(seed, "data.generated.train", k)`` (and ``.test``) whenever a worker needs them, so a
population of a million clients costs no memory. Meant for benchmarks and scale tests
(``scenarios/bench_tiny.toml``); labels are IID across clients.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field

from fedsim.data.federation import DATASETS
from fedsim.rng import np_rng
from fedsim.sections import Section


@DATASETS.register("generated")
class GeneratedData(Section):
    """Gaussian class clusters generated per client from the seed (benchmarks, huge populations)."""

    dataset: Literal["generated"] = Field(
        "generated", description="Dataset name: per-client data generated on demand."
    )
    num_clients: int = Field(1000, ge=1, description="Number of clients (no memory per client).")
    samples_per_client: int = Field(50, ge=1, description="Training examples per client.")
    test_samples_per_client: int = Field(
        10, ge=0, description="Held-out examples per client (client-side evaluation)."
    )
    input_shape: list[int] = Field(
        [784], min_length=1, description="Shape of one example, e.g. [784] or [1, 28, 28]."
    )
    num_classes: int = Field(10, ge=2, description="Number of classes.")
    server_test_samples: int = Field(
        1000, ge=1, description="Size of the server's test split (centralized evaluation)."
    )
    noise: float = Field(1.0, gt=0, description="Standard deviation around each class centre.")

    def load(self, *, seed: int) -> GeneratedFederation:
        return GeneratedFederation(self, seed)


class GeneratedFederation:
    """The Federation interface (per-client train/test data, server test split), lazily."""

    def __init__(self, spec: GeneratedData, seed: int) -> None:
        self.spec = spec
        self.seed = seed
        self.num_clients = spec.num_clients
        self.num_classes = spec.num_classes
        self.input_shape = tuple(spec.input_shape)
        dim = math.prod(self.input_shape)
        rng = np_rng(seed, "data.generated.centres")
        self._centres = rng.standard_normal((self.num_classes, dim), dtype=np.float32)
        self.x_test, self.y_test = self._draw(rng, spec.server_test_samples)
        for a in (self.x_test, self.y_test):
            a.flags.writeable = False

    def _labels(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.num_classes, size=n, dtype=np.int64)

    def _draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        y = self._labels(rng, n)  # (first: the labels alone are the stream's first draw)
        x = rng.standard_normal((n, self._centres.shape[1]), dtype=np.float32)
        x *= np.float32(self.spec.noise)
        x += self._centres[y]
        return x.reshape((n, *self.input_shape)), y

    def _stream(self, cid: int, part: str) -> np.random.Generator:
        # Train and test parts have their own streams: evaluation never regenerates
        # the training data.
        if not 0 <= cid < self.num_clients:
            raise IndexError(f"client {cid} out of range")
        return np_rng(self.seed, f"data.generated.{part}", cid)

    def _client(self, cid: int, part: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self._draw(self._stream(cid, part), n)

    def train_data(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        return self._client(cid, "train", self.spec.samples_per_client)

    def train_labels(self, cid: int) -> np.ndarray:
        """``train_data(cid)[1]``, without drawing the examples (a client of 50 examples
        of 784 values: 13 µs instead of 420 here)."""
        return self._labels(self._stream(cid, "train"), self.spec.samples_per_client)

    def test_data(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        return self._client(cid, "test", self.spec.test_samples_per_client)

    def train_sizes(self) -> np.ndarray:
        return np.full(self.num_clients, self.spec.samples_per_client, dtype=np.int64)

    def test_sizes(self) -> np.ndarray:
        return np.full(self.num_clients, self.spec.test_samples_per_client, dtype=np.int64)
