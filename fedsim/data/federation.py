"""A loaded federated dataset, and the steps every loader shares to build one.

A :class:`Federation` holds the arrays once; clients are index arrays into them, so a
Ray worker keeps one copy however many clients it hosts. Loaders draw the server test
split, partition the pool and split each client's shard into local train / test with
generators derived from the run's root seed (``fedsim.rng.np_rng``), never global state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from pydantic import Field

from fedsim.data.partition import IidPartition, PartitionError, PartitionSpec, largest_remainder
from fedsim.errors import ScenarioError
from fedsim.registry import Registry
from fedsim.rng import np_rng
from fedsim.sections import Section

DATASETS: Registry[type[Section]] = Registry("dataset", key="dataset", default="digits")


class PartitionedData(Section):
    """Keys shared by datasets without a natural split: a partitioner, local held-out data."""

    client_test_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Fraction of each client's shard kept back for local evaluation.",
    )
    partition: PartitionSpec = Field(
        default_factory=IidPartition,
        description="How the pool is split among clients (table with a 'kind' key).",
    )


def _frozen(a: np.ndarray, dtype: type) -> np.ndarray:
    out = np.ascontiguousarray(a, dtype=dtype)
    if out is a or out.base is not None:
        out = out.copy()
    out.flags.writeable = False
    return out


@dataclass(frozen=True, eq=False)
class Federation:
    """Every client's data as index arrays into one pool, plus a server-side test split.

    All arrays are made read-only: a Federation is cached and shared by every client a
    process hosts, so nobody may change it in place (index it to get a writable copy).

    Attributes:
        x: float32, shape ``(N, *input_shape)``: every client-held example.
        y: int64, shape ``(N,)``.
        train_idx: per client, sorted indices into ``x`` / ``y`` for local training.
        test_idx: per client, sorted held-out indices (local evaluation).
        x_test: float32 server-side (centralised) test inputs.
        y_test: int64 server-side test labels.
        num_classes: number of classes (labels lie in ``range(num_classes)``).
        input_shape: shape of one example, e.g. ``(60,)``, ``(1, 8, 8)``, ``(1, 28, 28)``.
    """

    x: np.ndarray
    y: np.ndarray
    train_idx: tuple[np.ndarray, ...]
    test_idx: tuple[np.ndarray, ...]
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen dataclass: normalise once, here
        put(self, "x", _frozen(self.x, np.float32))
        put(self, "y", _frozen(self.y, np.int64))
        put(self, "x_test", _frozen(self.x_test, np.float32))
        put(self, "y_test", _frozen(self.y_test, np.int64))
        put(self, "train_idx", tuple(_frozen(i, np.int64) for i in self.train_idx))
        put(self, "test_idx", tuple(_frozen(i, np.int64) for i in self.test_idx))
        put(self, "input_shape", tuple(int(d) for d in self.input_shape))
        if self.x.shape[0] != self.y.shape[0] or self.x_test.shape[0] != self.y_test.shape[0]:
            raise ValueError("x and y (and x_test and y_test) must have the same length")
        if self.x.shape[1:] != self.input_shape or self.x_test.shape[1:] != self.input_shape:
            raise ValueError(f"examples must have shape {self.input_shape}")
        if len(self.train_idx) != len(self.test_idx):
            raise ValueError("train_idx and test_idx must have one entry per client")

    @property
    def num_clients(self) -> int:
        return len(self.train_idx)

    # The per-client interface every federation offers (see also GeneratedFederation).
    def train_data(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.train_idx[cid]
        return self.x[idx], self.y[idx]

    def test_data(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.test_idx[cid]
        return self.x[idx], self.y[idx]

    def train_labels(self, cid: int) -> np.ndarray:
        """``train_data(cid)[1]`` without indexing the examples."""
        return self.y[self.train_idx[cid]]

    def train_sizes(self) -> np.ndarray:
        return np.array([i.size for i in self.train_idx], dtype=np.int64)

    def test_sizes(self) -> np.ndarray:
        return np.array([i.size for i in self.test_idx], dtype=np.int64)


class Partitioner(Protocol):
    """What a partition parameter model offers (see ``fedsim.data.partition``)."""

    def split(
        self, labels: np.ndarray, *, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]: ...


def stratified_split(
    labels: np.ndarray, *, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``round(N * fraction)`` examples with the class mix of the whole.

    Per-class test counts are apportioned by largest remainder. Returns sorted
    ``(keep, held_out)`` index arrays that together cover ``range(N)`` exactly once.
    """
    labels = np.asarray(labels)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    per_class = largest_remainder(counts, round(labels.size * fraction))
    held = [
        rng.permutation(np.flatnonzero(inverse == c))[:k]
        for c, k in zip(range(classes.size), per_class, strict=True)
    ]
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(labels.size, dtype=bool)
    mask[held_out] = False
    return np.flatnonzero(mask).astype(np.int64), held_out.astype(np.int64)


def local_split(
    part: np.ndarray, *, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's shard at random: ``floor(m * fraction)`` held out, rest train."""
    perm = rng.permutation(np.asarray(part, dtype=np.int64))
    n_test = int(np.floor(perm.size * fraction + 1e-9))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def scenario_error(exc: PartitionError) -> ScenarioError:
    """The scenario-level error for a failed partition (key paths from the root)."""
    if exc.field == "num_clients":
        path = "data.num_clients"
    elif exc.field:
        path = f"data.partition.{exc.field}"
    else:
        path = "data.partition"
    return ScenarioError([(path, str(exc))])


def build_federation(
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    partition: Partitioner,
    num_clients: int,
    client_test_fraction: float,
    num_classes: int,
    seed: int,
) -> Federation:
    """Partition the pool ``(x, y)`` and split each client's shard into train / test.

    Randomness: ``np_rng(seed, "data.partition")`` for the partition and
    ``np_rng(seed, "data.local_split", client)`` for each client's local split.
    A :class:`PartitionError` becomes a :class:`ScenarioError` naming the scenario key.
    """
    try:
        parts = partition.split(y, num_clients=num_clients, rng=np_rng(seed, "data.partition"))
    except PartitionError as exc:
        raise scenario_error(exc) from exc
    train, test = [], []
    for client, part in enumerate(parts):
        tr, te = local_split(
            part, fraction=client_test_fraction, rng=np_rng(seed, "data.local_split", client)
        )
        train.append(tr)
        test.append(te)
    return Federation(
        x=x,
        y=y,
        train_idx=tuple(train),
        test_idx=tuple(test),
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
        input_shape=tuple(x.shape[1:]),
    )
