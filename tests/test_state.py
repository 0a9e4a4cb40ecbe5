"""State trees survive JSON + safetensors exactly, and nothing else is accepted."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM
from safetensors.numpy import load, save

from fedsim.engine.checkpoint import restore_strategy, strategy_state
from fedsim.state import Encoder, StateError, decode


def _roundtrip(tree):
    enc = Encoder()
    doc = json.loads(json.dumps(enc.encode(tree), allow_nan=False))
    arrays = load(save(enc.arrays)) if enc.arrays else {}
    return decode(doc, arrays)


def test_scalars_arrays_and_containers_round_trip_exactly():
    tree = {
        "i": 3,
        "big": 2**127 + 5,  # a PCG64 state
        "f": 0.1,
        "nan": float("nan"),
        "inf": -float("inf"),
        "f32": np.float32(0.1),
        "i64": np.int64(-7),
        "b": True,
        "none": None,
        "s": "x",
        "bytes": b"\x00\xff",
        "tuple": (1, 2.5),
        "list": [np.arange(3, dtype=np.int16), {"nested": np.ones((2, 3), np.float32)}],
    }
    got = _roundtrip(tree)
    assert got["i"] == 3 and got["big"] == 2**127 + 5 and got["f"] == 0.1
    assert math.isnan(got["nan"]) and got["inf"] == -math.inf
    assert type(got["f32"]) is np.float32 and got["f32"] == np.float32(0.1)
    assert type(got["i64"]) is np.int64 and got["i64"] == -7
    assert got["b"] is True and got["none"] is None and got["s"] == "x"
    assert got["bytes"] == b"\x00\xff" and got["tuple"] == (1, 2.5)
    assert got["list"][0].dtype == np.int16 and got["list"][0].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(got["list"][1]["nested"], np.ones((2, 3), np.float32))


def test_flower_records_round_trip():
    rd = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.array([[1.5, -2.0]], dtype=np.float32))}),
            "metrics": MetricRecord({"loss": 0.25, "n": 4, "hist": [1.0, 2.0]}),
            "config": ConfigRecord({"name": "c", "flag": True, "blob": b"ab"}),
        }
    )
    got = _roundtrip(rd)
    assert isinstance(got, RecordDict)
    w = got["arrays"]["w"].numpy()
    assert w.dtype == np.float32 and w.tolist() == [[1.5, -2.0]]
    assert dict(got["metrics"]) == {"loss": 0.25, "n": 4, "hist": [1.0, 2.0]}
    assert dict(got["config"]) == {"name": "c", "flag": True, "blob": b"ab"}


@pytest.mark.parametrize("bad", [object(), {1: "int key"}, np.array(["s"]), 1j])
def test_what_cannot_be_saved_is_an_error(bad):
    with pytest.raises(StateError):
        Encoder().encode({"x": bad})


@pytest.mark.parametrize(
    "doc",
    [
        {"pickle": "gASV"},  # an unknown tag is never interpreted
        {"nd": "a9"},  # an array that is not there
        {"float": "1e400"},
        {"dict": 3},
        [1, 2],
        {"f32": "x"},
    ],
)
def test_malformed_trees_are_refused(doc):
    with pytest.raises(StateError):
        decode(doc, {})


def _state(strategy):
    enc = Encoder()
    doc = json.loads(json.dumps(enc.encode(strategy_state(strategy))))
    return decode(doc, load(save(enc.arrays)))


def test_fedadam_moments_and_current_arrays_are_saved_and_restored():
    s = FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99)
    s.current_arrays = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    s.m_t = {"w": np.array([0.1, 0.2], dtype=np.float32)}
    s.v_t = {"w": np.array([0.01, 0.04], dtype=np.float32)}
    fresh = FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99)
    restore_strategy(fresh, _state(s))
    for key in ("current_arrays", "m_t", "v_t"):
        np.testing.assert_array_equal(getattr(fresh, key)["w"], getattr(s, key)["w"])
        assert getattr(fresh, key)["w"].dtype == np.float32
    # The functions (aggregation callbacks) are the fresh strategy's own.
    assert fresh.train_metrics_aggr_fn is not None


def test_fedavgm_momentum_list_and_arrayrecord_are_restored():
    s = FedAvgM(server_momentum=0.9)
    s.current_arrays = ArrayRecord({"w": Array(np.array([3.0], dtype=np.float32))})
    s.momentum_vector = [np.array([0.5], dtype=np.float32)]
    fresh = FedAvgM(server_momentum=0.9)
    restore_strategy(fresh, _state(s))
    assert fresh.current_arrays["w"].numpy().tolist() == [3.0]
    assert [m.tolist() for m in fresh.momentum_vector] == [[0.5]]


def test_a_strategy_attribute_that_cannot_be_saved_names_itself():
    s = FedAdam()
    s.oddity = object()
    with pytest.raises(StateError, match="oddity"):
        Encoder().encode(strategy_state(s), "strategy")
