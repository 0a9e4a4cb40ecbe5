"""sklearn digits: shapes, stratified server split, partition errors as scenario errors."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest

from fedsim.data import DigitsData, DirichletPartition, ShardsPartition
from fedsim.data.federation import local_split, stratified_split
from fedsim.errors import ScenarioError

N_DIGITS = 1797


def test_shapes_scaling_and_split_sizes() -> None:
    fed = DigitsData(num_clients=10, test_fraction=0.25, client_test_fraction=0.2).load(seed=0)
    n_test = round(N_DIGITS * 0.25)
    assert fed.x_test.shape == (n_test, 1, 8, 8) and fed.y_test.shape == (n_test,)
    assert fed.x.shape == (N_DIGITS - n_test, 1, 8, 8)
    assert fed.x.dtype == np.float32 and fed.y.dtype == np.int64
    assert fed.input_shape == (1, 8, 8) and fed.num_classes == 10 and fed.num_clients == 10
    assert fed.x.min() >= 0.0 and fed.x.max() == 1.0
    # IID partition of the pool, then each shard 80/20 locally: everything used once
    everything = np.concatenate(fed.train_idx + fed.test_idx)
    np.testing.assert_array_equal(np.sort(everything), np.arange(fed.x.shape[0]))
    for tr, te in zip(fed.train_idx, fed.test_idx, strict=True):
        assert te.size == int((tr.size + te.size) * 0.2)


def test_server_split_is_stratified() -> None:
    fed = DigitsData(test_fraction=0.2).load(seed=3)
    all_counts = np.bincount(np.concatenate([fed.y, fed.y_test]), minlength=10)
    test_counts = np.bincount(fed.y_test, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * all_counts) <= 1)


def test_server_split_and_pool_are_disjoint_images() -> None:
    fed = DigitsData(num_clients=5).load(seed=0)
    pool = {row.tobytes() for row in fed.x}
    # the digits set has a few duplicate images; nearly all test images are new
    assert sum(row.tobytes() in pool for row in fed.x_test) < 5


def test_stratified_split_helper() -> None:
    labels = np.repeat(np.arange(3), [10, 20, 70])
    keep, held = stratified_split(labels, fraction=0.1, rng=np.random.default_rng(0))
    assert held.size == 10 and keep.size == 90
    assert np.bincount(labels[held], minlength=3).tolist() == [1, 2, 7]
    np.testing.assert_array_equal(np.sort(np.concatenate([keep, held])), np.arange(100))


def test_local_split_helper() -> None:
    train, test = local_split(np.arange(10, 30), fraction=0.25, rng=np.random.default_rng(0))
    assert train.size == 15 and test.size == 5
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(10, 30))
    train, test = local_split(np.arange(3), fraction=0.0, rng=np.random.default_rng(0))
    assert train.tolist() == [0, 1, 2] and test.size == 0


def test_seed_reproducible_and_partition_applies() -> None:
    spec = DigitsData(num_clients=8, partition=ShardsPartition(shards_per_client=2))
    a, b, c = spec.load(seed=5), spec.load(seed=5), spec.load(seed=6)
    for x, y in zip(a.train_idx, b.train_idx, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.y_test, c.y_test) or not all(
        np.array_equal(x, y) for x, y in zip(a.train_idx, c.train_idx, strict=True)
    )
    for tr, te in zip(a.train_idx, a.test_idx, strict=True):
        assert np.unique(a.y[np.concatenate([tr, te])]).size <= 2


def test_arrays_are_read_only() -> None:
    fed = DigitsData(num_clients=2).load(seed=0)
    with pytest.raises(ValueError, match="read-only"):
        fed.x[0] = 0.0
    with pytest.raises(ValueError, match="read-only"):
        fed.train_idx[0][0] = 1


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        (DigitsData(num_clients=5000), "data.num_clients"),
        (
            DigitsData(num_clients=200, partition=ShardsPartition(shards_per_client=10)),
            "data.partition.shards_per_client",
        ),
        (
            DigitsData(
                num_clients=20,
                partition=DirichletPartition(alpha=0.01, variant="flower", min_partition_size=60),
            ),
            "data.partition.min_partition_size",
        ),
    ],
)
def test_impossible_partitions_are_scenario_errors(spec: DigitsData, path: str) -> None:
    with pytest.raises(ScenarioError) as info:
        spec.load(seed=0)
    [(key, message)] = info.value.problems
    assert key == path
    assert message


@pytest.mark.parametrize(
    "bad",
    [
        {"test_fraction": 0.0},
        {"test_fraction": 1.0},
        {"client_test_fraction": 1.0},
        {"num_clients": 0},
        {"partition": {"kind": "nope"}},
        {"unknown": 1},
    ],
)
def test_invalid_fields_rejected(bad: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        DigitsData(**bad)
