"""Package API: dataset registry and spec union, the per-process cache, the summary."""

from __future__ import annotations

import json

import numpy as np
import pydantic
import pytest
from pydantic import TypeAdapter

from fedsim.data import (
    DATASETS,
    DataSpec,
    DigitsData,
    DirichletPartition,
    Federation,
    SyntheticData,
    clear_federation_cache,
    load_federation,
    partition_summary,
)

ADAPTER = TypeAdapter(DataSpec)


def test_registry_lists_known_datasets() -> None:
    assert DATASETS.names() == ["digits", "generated", "mnist", "synthetic"]
    assert DATASETS.get("digits") is DigitsData
    with pytest.raises(
        ValueError, match="unknown dataset 'cifar'; known: digits, generated, mnist, synthetic"
    ):
        DATASETS.get("cifar")


def test_spec_union_picks_by_dataset_key() -> None:
    spec = ADAPTER.validate_python(
        {"dataset": "digits", "num_clients": 4, "partition": {"kind": "dirichlet", "alpha": 0.3}}
    )
    assert isinstance(spec, DigitsData)
    assert spec.partition == DirichletPartition(alpha=0.3)
    assert isinstance(ADAPTER.validate_python({"dataset": "synthetic"}), SyntheticData)
    with pytest.raises(pydantic.ValidationError):
        ADAPTER.validate_python({"dataset": "cifar"})
    with pytest.raises(pydantic.ValidationError):
        ADAPTER.validate_python({"dataset": "synthetic", "alpha": -1})


def test_every_field_has_a_description() -> None:
    schema = ADAPTER.json_schema()
    for model in schema["$defs"].values():
        for name, prop in model["properties"].items():
            assert prop.get("description"), f"{model['title']}.{name} lacks a description"


def test_load_federation_caches_two_entries() -> None:
    clear_federation_cache()
    a = SyntheticData(num_clients=2)
    b = SyntheticData(num_clients=3)
    fa = load_federation(a, seed=0)
    assert load_federation(SyntheticData(num_clients=2), seed=0) is fa
    assert load_federation(a, seed=1) is not fa
    load_federation(b, seed=0)  # third key: evicts the least recently used (a, seed=0)
    again = load_federation(a, seed=0)
    assert again is not fa
    np.testing.assert_array_equal(again.x, fa.x)
    clear_federation_cache()


def test_partition_summary_is_json_ready() -> None:
    fed = DigitsData(num_clients=3).load(seed=0)
    summary = partition_summary(fed)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["num_clients"] == 3 and summary["num_classes"] == 10
    for i, client in enumerate(summary["clients"]):
        assert client["client_id"] == i
        assert client["train_size"] == fed.train_idx[i].size
        assert client["test_size"] == fed.test_idx[i].size
        assert sum(client["label_histogram"]) == client["train_size"]
        assert (
            client["label_histogram"] == np.bincount(fed.y[fed.train_idx[i]], minlength=10).tolist()
        )
        assert np.array_equal(fed.train_labels(i), fed.train_data(i)[1])


def test_federation_checks_shapes() -> None:
    x = np.zeros((4, 2), dtype=np.float32)
    y = np.zeros(4, dtype=np.int64)
    idx = (np.arange(4),)
    with pytest.raises(ValueError, match="same length"):
        Federation(x, y[:3], idx, idx, x, y, 2, (2,))
    with pytest.raises(ValueError, match="shape"):
        Federation(x, y, idx, idx, x, y, 2, (3,))
    fed = Federation(x.astype(np.float64), y.astype(np.int32), idx, idx, x, y, 2, [2])
    assert fed.x.dtype == np.float32 and fed.y.dtype == np.int64 and fed.input_shape == (2,)
    x[0, 0] = 5.0  # the federation holds its own copy
    assert fed.x_test[0, 0] == 0.0
