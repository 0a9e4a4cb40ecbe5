"""Partitioners: coverage without repeats (property tests), skew, sizes, seeding, errors."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from fedsim.data import PARTITIONERS, PartitionSpec
from fedsim.data.partition import (
    DirichletPartition,
    IidPartition,
    PartitionError,
    QuantityPartition,
    ShardsPartition,
    dirichlet_flower,
    dirichlet_hsu,
    iid_partition,
    largest_remainder,
    quantity_partition,
    shards_partition,
)

PROPERTY = settings(max_examples=60, deadline=None)

label_arrays = st.lists(st.integers(0, 9), min_size=1, max_size=300).map(
    lambda xs: np.asarray(xs, dtype=np.int64)
)
seeds = st.integers(0, 2**32 - 1)


def assert_disjoint_subset(parts: list[np.ndarray], n: int) -> np.ndarray:
    """No index twice, all in range(n), every part sorted int64; returns the union."""
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each client's indices are sorted and unique"
    union = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    assert np.unique(union).size == union.size, "an example was assigned twice"
    assert union.size == 0 or (union.min() >= 0 and union.max() < n)
    return union


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    union = assert_disjoint_subset(parts, n)
    assert np.array_equal(np.sort(union), np.arange(n))


# -- coverage properties --------------------------------------------------------------


@PROPERTY
@given(n=st.integers(1, 500), data=st.data(), seed=seeds)
def test_iid_covers_exactly_once_near_equal(n: int, data: st.DataObject, seed: int) -> None:
    k = data.draw(st.integers(1, min(n, 40)))
    parts = iid_partition(n, num_clients=k, rng=np.random.default_rng(seed))
    assert len(parts) == k
    assert_exact_cover(parts, n)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1


@PROPERTY
@given(labels=label_arrays, data=st.data(), seed=seeds, alpha=st.sampled_from([0.01, 0.5, 50.0]))
def test_hsu_disjoint_equal_sizes(
    labels: np.ndarray, data: st.DataObject, seed: int, alpha: float
) -> None:
    k = data.draw(st.integers(1, min(labels.size, 20)))
    parts = dirichlet_hsu(labels, num_clients=k, alpha=alpha, rng=np.random.default_rng(seed))
    assert len(parts) == k
    union = assert_disjoint_subset(parts, labels.size)
    assert {p.size for p in parts} == {labels.size // k}
    assert union.size == k * (labels.size // k)


@PROPERTY
@given(labels=label_arrays, data=st.data(), seed=seeds, alpha=st.sampled_from([0.01, 0.5, 50.0]))
def test_flower_covers_exactly_once(
    labels: np.ndarray, data: st.DataObject, seed: int, alpha: float
) -> None:
    k = data.draw(st.integers(1, min(labels.size, 20)))
    balancing = data.draw(st.booleans())
    parts = dirichlet_flower(
        labels,
        num_clients=k,
        alpha=alpha,
        min_partition_size=0,
        rng=np.random.default_rng(seed),
        self_balancing=balancing,
    )
    assert len(parts) == k
    assert_exact_cover(parts, labels.size)


@PROPERTY
@given(labels=label_arrays, data=st.data(), seed=seeds)
def test_shards_disjoint_and_at_most_s_labels(
    labels: np.ndarray, data: st.DataObject, seed: int
) -> None:
    s = data.draw(st.integers(1, 4))
    assume(labels.size >= s)
    k = data.draw(st.integers(1, labels.size // s))
    parts = shards_partition(
        labels, num_clients=k, shards_per_client=s, rng=np.random.default_rng(seed)
    )
    assert len(parts) == k
    union = assert_disjoint_subset(parts, labels.size)
    for p in parts:
        assert 1 <= np.unique(labels[p]).size <= s
    if k * s >= np.unique(labels).size:  # every class gets a shard: all assigned
        assert union.size == labels.size


@PROPERTY
@given(n=st.integers(1, 500), data=st.data(), seed=seeds, sigma=st.sampled_from([0.1, 1.0, 3.0]))
def test_quantity_disjoint_nonempty(n: int, data: st.DataObject, seed: int, sigma: float) -> None:
    k = data.draw(st.integers(1, min(n, 40)))
    parts = quantity_partition(n, num_clients=k, sigma=sigma, rng=np.random.default_rng(seed))
    assert len(parts) == k
    union = assert_disjoint_subset(parts, n)
    assert union.size <= n
    assert min(p.size for p in parts) >= 1


@given(
    weights=st.lists(st.floats(0, 100), min_size=1, max_size=30),
    total=st.integers(0, 1000),
)
@settings(deadline=None)
def test_largest_remainder_sums_and_stays_within_quota(weights: list[float], total: int) -> None:
    w = np.asarray(weights)
    got = largest_remainder(w, total)
    assert got.sum() == total
    assert np.all(got >= 0)
    if w.sum() > 0:
        quota = total * w / w.sum()
        assert np.all(got >= np.floor(quota) - 1e-9) and np.all(got <= np.ceil(quota) + 1e-9)


# -- shape of the skew ----------------------------------------------------------------

BALANCED = np.repeat(np.arange(10), 400)  # 4,000 examples, 10 balanced classes


def mean_label_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    ents = []
    for p in parts:
        counts = np.bincount(labels[p], minlength=10)
        q = counts[counts > 0] / counts.sum()
        ents.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(ents))


@pytest.mark.parametrize("variant", ["hsu", "flower"])
def test_dirichlet_entropy_falls_with_alpha(variant: str) -> None:
    entropies = []
    for alpha in (100.0, 1.0, 0.05):
        spec = DirichletPartition(alpha=alpha, variant=variant, min_partition_size=0)
        parts = spec.split(BALANCED, num_clients=20, rng=np.random.default_rng(3))
        entropies.append(mean_label_entropy(parts, BALANCED))
    assert entropies[0] > entropies[1] > entropies[2]
    assert entropies[0] > 0.9 * np.log(10)  # alpha = 100 is close to IID
    assert entropies[2] < 0.6  # alpha = 0.05: a class or two per client


def test_hsu_equal_sizes_and_leftovers() -> None:
    labels = np.repeat(np.arange(10), 101)  # 1,010 examples over 7 clients: 144 each
    parts = dirichlet_hsu(labels, num_clients=7, alpha=0.1, rng=np.random.default_rng(0))
    assert [p.size for p in parts] == [144] * 7
    assert_disjoint_subset(parts, labels.size)


def test_hsu_follows_client_mix_when_pool_is_ample() -> None:
    # One client taking 10 of 10,000 examples: its labels come from q, and a tiny alpha
    # puts nearly all of q on one class.
    labels = np.repeat(np.arange(10), 1000)
    parts = dirichlet_hsu(labels, num_clients=1000, alpha=0.001, rng=np.random.default_rng(1))
    single = np.mean([np.unique(labels[p]).size == 1 for p in parts[:200]])
    assert single > 0.9


def test_shards_balanced_client_sizes_and_labels() -> None:
    parts = shards_partition(
        BALANCED, num_clients=20, shards_per_client=2, rng=np.random.default_rng(0)
    )
    assert_exact_cover(parts, BALANCED.size)
    assert {p.size for p in parts} == {200}
    assert max(np.unique(BALANCED[p]).size for p in parts) <= 2


def test_shards_unbalanced_sizes_stay_near_equal() -> None:
    labels = np.concatenate([np.full(c, k) for k, c in enumerate([900, 50, 300, 7, 1000])])
    parts = shards_partition(
        labels, num_clients=30, shards_per_client=3, rng=np.random.default_rng(5)
    )
    assert_exact_cover(parts, labels.size)
    sizes = np.array([p.size for p in parts])
    assert sizes.min() >= 0.5 * sizes.mean() and sizes.max() <= 1.5 * sizes.mean()
    assert max(np.unique(labels[p]).size for p in parts) <= 3


def test_shards_fewer_shards_than_classes_leaves_classes_out() -> None:
    labels = np.repeat(np.arange(10), 20)
    parts = shards_partition(
        labels, num_clients=2, shards_per_client=2, rng=np.random.default_rng(0)
    )
    union = assert_disjoint_subset(parts, labels.size)
    assert np.unique(labels[union]).size == 4
    assert all(np.unique(labels[p]).size <= 2 for p in parts)


def test_quantity_sizes_vary_lognormally() -> None:
    parts = quantity_partition(10_000, num_clients=200, sigma=1.0, rng=np.random.default_rng(0))
    sizes = np.array([p.size for p in parts])
    assert sizes.sum() <= 10_000
    assert sizes.min() >= 1
    assert sizes.max() > 4 * np.median(sizes)  # heavy right tail
    # log sizes have std close to sigma (up to rounding of small clients)
    assert 0.8 < np.log(sizes).std() < 1.2
    flat = quantity_partition(10_000, num_clients=200, sigma=0.01, rng=np.random.default_rng(0))
    assert max(p.size for p in flat) - min(p.size for p in flat) <= 3


# -- seeding --------------------------------------------------------------------------

SPECS = [
    IidPartition(),
    DirichletPartition(alpha=0.5, variant="hsu"),
    DirichletPartition(alpha=0.5, variant="flower", min_partition_size=5),
    ShardsPartition(shards_per_client=2),
    QuantityPartition(sigma=1.0),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{getattr(s, 'variant', '')}")
def test_same_seed_same_partition_other_seed_differs(spec: pydantic.BaseModel) -> None:
    def run(seed: int) -> list[np.ndarray]:
        return spec.split(BALANCED, num_clients=10, rng=np.random.default_rng(seed))

    a, b, c = run(7), run(7), run(8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


# -- errors and the registry ----------------------------------------------------------


def test_too_many_shards_names_the_field() -> None:
    with pytest.raises(PartitionError, match="shards") as info:
        shards_partition(
            np.zeros(10, dtype=int),
            num_clients=4,
            shards_per_client=3,
            rng=np.random.default_rng(0),
        )
    assert info.value.field == "shards_per_client"
    assert isinstance(info.value, ValueError)


def test_flower_min_partition_size_unreachable() -> None:
    labels = np.repeat(np.arange(10), 30)
    with pytest.raises(PartitionError, match="min_partition_size") as info:
        dirichlet_flower(
            labels, num_clients=10, alpha=0.01, min_partition_size=29, rng=np.random.default_rng(0)
        )
    assert info.value.field == "min_partition_size"
    with pytest.raises(PartitionError, match="needs 310 examples"):
        dirichlet_flower(
            labels, num_clients=10, alpha=1.0, min_partition_size=31, rng=np.random.default_rng(0)
        )


@pytest.mark.parametrize(
    "call",
    [
        lambda rng: iid_partition(3, num_clients=4, rng=rng),
        lambda rng: dirichlet_hsu(np.zeros(3, int), num_clients=4, alpha=1.0, rng=rng),
        lambda rng: quantity_partition(3, num_clients=4, sigma=1.0, rng=rng),
        lambda rng: dirichlet_flower(
            np.zeros(3, int), num_clients=4, alpha=1.0, min_partition_size=0, rng=rng
        ),
    ],
)
def test_more_clients_than_examples(call) -> None:  # noqa: ANN001
    with pytest.raises(PartitionError, match="4 clients but only 3 examples") as info:
        call(np.random.default_rng(0))
    assert info.value.field == "num_clients"


def test_registry_lists_known_partitioners() -> None:
    assert PARTITIONERS.names() == ["dirichlet", "iid", "quantity", "shards"]
    assert PARTITIONERS.get("shards") is ShardsPartition
    with pytest.raises(ValueError, match="unknown partitioner 'nope'; known: dirichlet, iid"):
        PARTITIONERS.get("nope")


def test_partition_spec_validation() -> None:
    adapter = TypeAdapter(PartitionSpec)
    spec = adapter.validate_python({"kind": "dirichlet", "alpha": 0.1, "variant": "flower"})
    assert isinstance(spec, DirichletPartition) and spec.min_partition_size == 10
    for bad in (
        {"kind": "nope"},
        {"kind": "dirichlet", "alpha": 0},
        {"kind": "shards", "shards_per_client": 0},
        {"kind": "quantity", "sigma": -1},
        {"kind": "iid", "extra": 1},
        {"kind": "dirichlet", "variant": "other"},
    ):
        with pytest.raises(pydantic.ValidationError):
            adapter.validate_python(bad)
    schema = adapter.json_schema()
    for model in schema["$defs"].values():
        for name, prop in model["properties"].items():
            assert prop.get("description"), f"{name} lacks a description"
