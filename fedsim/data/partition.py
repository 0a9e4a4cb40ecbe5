"""Partitioners: split a labelled pool into per-client index arrays.

Every function here is pure: it reads a label array (or an example count), draws only
from the ``rng`` it is given, and returns one sorted ``int64`` index array per client.
No example is ever assigned to two clients; some partitioners leave examples unassigned.

Papers:

- IID: a random permutation cut into near-equal parts (the IID baseline of McMahan et
  al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
  Data", arXiv:1602.05629).
- ``dirichlet_hsu``: Hsu, Qi, Brown 2019, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification", arXiv:1909.06335.
- ``dirichlet_flower``: the per-class Dirichlet split of Yurochkin et al. 2019,
  "Bayesian Nonparametric Federated Learning of Neural Networks", arXiv:1905.12022, as
  Flower Datasets' ``DirichletPartitioner`` implements it (self-balancing, retries).
- ``shards_partition``: the pathological non-IID shards of McMahan et al. 2017.
- ``quantity_partition``: quantity skew (Li, Diao, Chen, He 2022, "Federated Learning on
  Non-IID Data Silos: An Experimental Study", arXiv:2102.02079) with lognormal client
  sizes, the size law of the FedProx synthetic data (arXiv:1812.06127).

Impossible requests raise :class:`PartitionError` (a ``ValueError``) whose ``field``
names the parameter at fault, so loaders can point at the scenario key.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from fedsim.registry import Registry, Variants
from fedsim.sections import Section

PARTITIONERS: Registry[type[Section]] = Registry("partitioner", key="kind", default="iid")

#: Flower Datasets gives up after this many Dirichlet draws.
FLOWER_MAX_TRIES = 10


class PartitionError(ValueError):
    """An impossible partition request; ``field`` names the parameter at fault.

    ``field`` is ``"num_clients"`` for too many clients, a partitioner parameter name
    (``"shards_per_client"``, ``"min_partition_size"``, ...) or ``""``.
    """

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def _finish(parts: Iterable[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    return labels


def _check_clients(num_clients: int, num_examples: int) -> None:
    if num_clients < 1:
        raise PartitionError(f"num_clients must be >= 1, got {num_clients}", field="num_clients")
    if num_clients > num_examples:
        raise PartitionError(
            f"{num_clients} clients but only {num_examples} examples to share; "
            "use at most as many clients as examples",
            field="num_clients",
        )


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``weights`` summing to ``total`` (Hamilton's method).

    Each result lies between floor and ceil of its exact quota ``total * w / sum(w)``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if total == 0:
        return np.zeros(w.size, dtype=np.int64)
    if not w.sum() > 0:
        w = np.ones_like(w)
    quota = total * w / w.sum()
    counts = np.floor(quota).astype(np.int64)
    gap = int(total - counts.sum())
    frac = quota - counts
    if gap > 0:
        counts[np.argsort(-frac, kind="stable")[:gap]] += 1
    elif gap < 0:  # only through float rounding of the quotas
        nonzero = np.flatnonzero(counts > 0)
        counts[nonzero[np.argsort(frac[nonzero], kind="stable")[:-gap]]] -= 1
    return counts


def iid_partition(
    num_examples: int, *, num_clients: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """IID split: a random permutation cut into ``num_clients`` near-equal parts.

    Covers ``range(num_examples)`` exactly once; sizes differ by at most one.
    """
    _check_clients(num_clients, num_examples)
    return _finish(np.array_split(rng.permutation(num_examples), num_clients))


def _hsu_counts(
    q: np.ndarray, *, available: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """How many examples of each class one client draws: ``n`` draws from ``q``.

    Drawing one example at a time and renormalising ``q`` over the classes not yet
    exhausted is rejection sampling; it yields the same counts as drawing multinomially,
    capping each class at what is left and redrawing the shortfall from the classes still
    open, which is what this does (in a few vectorised rounds instead of ``n`` steps).
    """
    got = np.zeros_like(available)
    need = n
    while need > 0:
        open_ = got < available
        p = np.where(open_, q, 0.0)
        if not p.sum() > 0:
            # All of q's mass sits on exhausted classes (possible when tiny alphas
            # underflow): fall back on the class mix of what is left in the pool.
            p = np.where(open_, available - got, 0).astype(np.float64)
        draw = rng.multinomial(need, p / p.sum())
        add = np.minimum(draw, available - got)
        got += add
        need -= int(add.sum())
    return got


def dirichlet_hsu(
    labels: np.ndarray, *, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Hsu et al. 2019 (arXiv:1909.06335): equal-size clients with Dir(alpha * p) mixes.

    Every client gets ``n = N // num_clients`` examples. Its class mix is
    ``q ~ Dir(alpha * p)`` with ``p`` the empirical class frequencies, and its examples
    are drawn class by class from the remaining pool without replacement; when a class
    runs out, ``q`` is renormalised over the classes left. ``alpha -> inf`` is IID,
    ``alpha -> 0`` gives one class per client. The ``N mod num_clients`` leftover
    examples stay unassigned.
    """
    labels = _labels(labels)
    if not alpha > 0:
        raise PartitionError(f"alpha must be > 0, got {alpha}", field="alpha")
    _check_clients(num_clients, labels.size)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    prior = counts / counts.sum()
    n = labels.size // num_clients
    pools = [rng.permutation(np.flatnonzero(inverse == c)) for c in range(counts.size)]
    taken = np.zeros(counts.size, dtype=np.int64)
    parts = []
    for _ in range(num_clients):
        q = rng.dirichlet(alpha * prior)
        want = _hsu_counts(q, available=counts - taken, n=n, rng=rng)
        parts.append(
            np.concatenate([pool[t : t + w] for pool, t, w in zip(pools, taken, want, strict=True)])
        )
        taken += want
    return _finish(parts)


def dirichlet_flower(
    labels: np.ndarray,
    *,
    num_clients: int,
    alpha: float,
    min_partition_size: int,
    rng: np.random.Generator,
    self_balancing: bool = True,
) -> list[np.ndarray]:
    """Per-class Dir(alpha) split, as Flower Datasets' ``DirichletPartitioner`` does it.

    Yurochkin et al. 2019 (arXiv:1905.12022). For each class k: draw proportions
    ``p ~ Dir(alpha * 1_K)`` over the K clients and cut the class's (shuffled) indices at
    ``cumsum(p) * n_k``. With ``self_balancing`` (Flower's default), a client already
    holding more than ``N / K`` examples gets no share of later classes. If some client
    ends with fewer than ``min_partition_size`` examples the whole split is redrawn, up to
    ``FLOWER_MAX_TRIES`` times, then :class:`PartitionError`. Client sizes are unequal;
    every example is assigned exactly once.
    """
    labels = _labels(labels)
    if not alpha > 0:
        raise PartitionError(f"alpha must be > 0, got {alpha}", field="alpha")
    _check_clients(num_clients, labels.size)
    if min_partition_size * num_clients > labels.size:
        raise PartitionError(
            f"min_partition_size={min_partition_size} for {num_clients} clients needs "
            f"{min_partition_size * num_clients} examples but there are {labels.size}",
            field="min_partition_size",
        )
    classes = np.unique(labels)
    average = labels.size / num_clients
    concentration = np.full(num_clients, float(alpha))
    smallest = 0
    for _ in range(FLOWER_MAX_TRIES):
        chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for k in classes:
            idx = rng.permutation(np.flatnonzero(labels == k))
            p = rng.dirichlet(concentration)
            if self_balancing:
                eligible = sizes <= average  # Flower excludes clients strictly above
                p = np.where(eligible, p, 0.0)
                if not p.sum() > 0:
                    p = eligible.astype(np.float64)
                p = p / p.sum()
            cuts = (np.cumsum(p) * idx.size).astype(np.int64)[:-1]
            for client, piece in enumerate(np.split(idx, cuts)):
                chunks[client].append(piece)
                sizes[client] += piece.size
        smallest = int(sizes.min())
        if smallest >= min_partition_size:
            return _finish(np.concatenate(c) for c in chunks)
    raise PartitionError(
        f"after {FLOWER_MAX_TRIES} Dirichlet draws (alpha={alpha}) some client still had "
        f"fewer than min_partition_size={min_partition_size} examples (smallest: "
        f"{smallest}); lower min_partition_size, raise alpha or use fewer clients",
        field="min_partition_size",
    )


def shards_partition(
    labels: np.ndarray, *, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """McMahan et al. 2017 (arXiv:1602.05629): sort by label, deal S shards per client.

    The paper sorts all examples by label and cuts them into ``num_clients * S`` equal
    shards, so a shard may straddle two classes. Deviation: shards here never straddle a
    class boundary, so each client holds at most ``S`` distinct labels. Each class with
    examples gets one shard and the remaining ``T - C`` of the ``T = num_clients * S``
    shards are shared among the C classes in proportion to ``n_c - 1`` (largest
    remainder), which keeps shard sizes near ``N / T`` and never gives a class more shards
    than examples. If ``T < C`` the ``T`` shards go to classes in proportion to ``n_c`` and
    classes with none stay unassigned. Each class is shuffled, cut into its shards
    (sizes differ by at most one), and shards are dealt to clients at random.
    """
    labels = _labels(labels)
    if shards_per_client < 1:
        raise PartitionError(
            f"shards_per_client must be >= 1, got {shards_per_client}", field="shards_per_client"
        )
    _check_clients(num_clients, labels.size)
    total = num_clients * shards_per_client
    if total > labels.size:
        raise PartitionError(
            f"{num_clients} clients x {shards_per_client} shards = {total} shards but only "
            f"{labels.size} examples; lower shards_per_client or num_clients",
            field="shards_per_client",
        )
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if total >= counts.size:
        per_class = 1 + largest_remainder(counts - 1, total - counts.size)
    else:
        per_class = largest_remainder(counts, total)
    shards: list[np.ndarray] = []
    for c, num_shards in enumerate(per_class):
        if num_shards > 0:
            shards.extend(np.array_split(rng.permutation(np.flatnonzero(inverse == c)), num_shards))
    order = rng.permutation(total)
    s = shards_per_client
    return _finish(
        np.concatenate([shards[j] for j in order[i * s : (i + 1) * s]]) for i in range(num_clients)
    )


def quantity_partition(
    num_examples: int, *, num_clients: int, sigma: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Quantity skew: client sizes follow lognormal(0, sigma) weights, labels stay IID.

    Each client gets one example plus a share of the other ``N - K`` proportional to its
    weight (largest remainder), so every client has at least one example and all ``N``
    are assigned; the examples themselves are a random permutation cut at those sizes.
    """
    if not sigma > 0:
        raise PartitionError(f"sigma must be > 0, got {sigma}", field="sigma")
    _check_clients(num_clients, num_examples)
    weights = rng.lognormal(0.0, sigma, num_clients)
    sizes = 1 + largest_remainder(weights, num_examples - num_clients)
    perm = rng.permutation(num_examples)
    return _finish(np.split(perm, np.cumsum(sizes)[:-1]))


# -- parameter models: the `[data.partition]` table of a scenario ----------------------


@PARTITIONERS.register("iid")
class IidPartition(Section):
    """IID: every client gets a near-equal random share of the pool."""

    kind: Literal["iid"] = Field("iid", description="Partitioner name: IID random split.")

    def split(
        self, labels: np.ndarray, *, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        return iid_partition(len(labels), num_clients=num_clients, rng=rng)


@PARTITIONERS.register("dirichlet")
class DirichletPartition(Section):
    """Label skew from a Dirichlet prior (Hsu et al. 2019, or Flower Datasets' split)."""

    kind: Literal["dirichlet"] = Field(
        "dirichlet", description="Partitioner name: Dirichlet label skew."
    )
    alpha: float = Field(
        0.5,
        gt=0,
        description="Dirichlet concentration: large is near-IID, small (e.g. 0.1) is "
        "strongly skewed.",
    )
    variant: Literal["hsu", "flower"] = Field(
        "hsu",
        description="'hsu': equal-size clients, class mix ~ Dir(alpha * class prior) "
        "(Hsu et al. 2019, arXiv:1909.06335). 'flower': each class split over clients by "
        "Dir(alpha), unequal sizes, as Flower Datasets' DirichletPartitioner.",
    )
    min_partition_size: int = Field(
        10,
        ge=0,
        description="Variant 'flower' only: redraw (up to 10 times) until every client "
        "has at least this many examples (Flower's default is 10).",
    )
    self_balancing: bool = Field(
        True,
        description="Variant 'flower' only: stop giving examples to a client once it "
        "holds more than the average (Flower's default).",
    )

    def split(
        self, labels: np.ndarray, *, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        if self.variant == "hsu":
            return dirichlet_hsu(labels, num_clients=num_clients, alpha=self.alpha, rng=rng)
        return dirichlet_flower(
            labels,
            num_clients=num_clients,
            alpha=self.alpha,
            min_partition_size=self.min_partition_size,
            rng=rng,
            self_balancing=self.self_balancing,
        )


@PARTITIONERS.register("shards")
class ShardsPartition(Section):
    """Pathological non-IID (McMahan et al. 2017): each client gets a few label shards."""

    kind: Literal["shards"] = Field("shards", description="Partitioner name: label shards.")
    shards_per_client: int = Field(
        2,
        ge=1,
        description="Shards per client; each shard holds one label, so a client sees at "
        "most this many labels.",
    )

    def split(
        self, labels: np.ndarray, *, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        return shards_partition(
            labels, num_clients=num_clients, shards_per_client=self.shards_per_client, rng=rng
        )


@PARTITIONERS.register("quantity")
class QuantityPartition(Section):
    """Quantity skew: lognormal client sizes, IID labels."""

    kind: Literal["quantity"] = Field(
        "quantity", description="Partitioner name: quantity (size) skew."
    )
    sigma: float = Field(
        1.0,
        gt=0,
        description="Standard deviation of the log of client sizes: larger is more unequal.",
    )

    def split(
        self, labels: np.ndarray, *, num_clients: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        return quantity_partition(len(labels), num_clients=num_clients, sigma=self.sigma, rng=rng)


# The [data.partition] table: a union of every registered partitioner.
PartitionSpec = Annotated[Section, Variants(PARTITIONERS)]
