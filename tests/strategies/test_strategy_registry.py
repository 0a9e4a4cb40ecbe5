"""Registry, parameter validation, check() rules and node selection of every strategy."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType
from flwr.serverapp.strategy import Strategy
from pydantic import TypeAdapter, ValidationError

from strategies import (
    SAMPLE_ALL_SHOWN_NODES,
    STRATEGIES,
    BulyanParams,
    FedAvgParams,
    KrumParams,
    MultiKrumParams,
    StrategyParams,
    StrategySpec,
)

EXPECTED_NAMES = {
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
    "qfedavg",
}
WEIGHTED_MEAN = {"fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad"}


def params_of(name: str, **values: object) -> StrategyParams:
    return STRATEGIES.get(name)(name=name, **values)


def test_registry_holds_every_strategy() -> None:
    assert set(STRATEGIES.names()) == EXPECTED_NAMES
    for name in EXPECTED_NAMES:
        assert params_of(name).name == name


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'") as excinfo:
        STRATEGIES.get("fedsgd")
    for name in EXPECTED_NAMES:
        assert name in str(excinfo.value)


def test_weighted_mean_flags() -> None:
    for name in EXPECTED_NAMES:
        assert STRATEGIES.get(name).weighted_mean is (name in WEIGHTED_MEAN), name


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_rejects_unknown_parameter(name: str) -> None:
    with pytest.raises(ValidationError, match="extra"):
        params_of(name, learning_rate_typo=0.1)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_rejects_another_strategys_name(name: str) -> None:
    other = "krum" if name != "krum" else "fedavg"
    with pytest.raises(ValidationError):
        STRATEGIES.get(name)(name=other)


OUT_OF_RANGE = [
    (name, field, value)
    for name in sorted(EXPECTED_NAMES)
    for field, value in [("clients_per_round", 0), ("evaluate_clients_per_round", -1)]
] + [
    ("fedavgm", "server_learning_rate", 0.0),
    ("fedavgm", "server_momentum", -0.1),
    ("fedavgm", "server_momentum", 1.0),
    ("fedprox", "proximal_mu", -0.01),
    ("fedadam", "eta", 0.0),
    ("fedadam", "eta_l", -1.0),
    ("fedadam", "beta_1", 1.0),
    ("fedadam", "beta_2", -0.1),
    ("fedadam", "tau", 0.0),
    ("fedyogi", "eta", -0.1),
    ("fedyogi", "beta_1", -0.5),
    ("fedyogi", "beta_2", 1.0),
    ("fedyogi", "tau", -1e-3),
    ("fedadagrad", "eta", 0.0),
    ("fedadagrad", "eta_l", 0.0),
    ("fedadagrad", "tau", 0.0),
    ("fedadagrad", "beta_1", 0.9),  # Adagrad has no momentum: unknown key
    ("fedtrimmedavg", "beta", 0.5),
    ("fedtrimmedavg", "beta", -0.1),
    ("krum", "num_malicious_nodes", -1),
    ("multikrum", "num_malicious_nodes", -1),
    ("multikrum", "num_nodes_to_select", 0),
    ("bulyan", "num_malicious_nodes", -1),
    ("qfedavg", "q", -0.1),
    ("qfedavg", "client_learning_rate", 0.0),
]


@pytest.mark.parametrize(("name", "field", "value"), OUT_OF_RANGE)
def test_rejects_out_of_range(name: str, field: str, value: object) -> None:
    with pytest.raises(ValidationError) as excinfo:
        params_of(name, **{field: value})
    assert excinfo.value.errors()[0]["loc"] == (field,)


def test_boundary_values_are_accepted() -> None:
    params_of("fedtrimmedavg", beta=0.0)
    params_of("fedavgm", server_momentum=0.0)
    params_of("fedprox", proximal_mu=0.0)
    params_of("fedadam", beta_1=0.0, beta_2=0.0)
    params_of("fedavg", evaluate_clients_per_round=0, clients_per_round=1)


def test_params_are_frozen() -> None:
    params = params_of("fedprox", proximal_mu=0.1)
    with pytest.raises(ValidationError):
        params.proximal_mu = 0.2  # type: ignore[misc]


def test_common_defaults() -> None:
    params = params_of("fedavg")
    assert params.clients_per_round is None
    assert params.evaluate_clients_per_round is None
    assert params.centralized_evaluation is True


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_defaults_match_flower(name: str) -> None:
    params = params_of(name)
    strategy = params.build(client_lr=0.1)
    flower_defaults = inspect.signature(type(strategy)).parameters
    own_fields = set(type(params).model_fields) - set(StrategyParams.model_fields)
    for field in own_fields - {"client_learning_rate"}:
        assert getattr(params, field) == flower_defaults[field].default, field
        assert getattr(strategy, field) == getattr(params, field), field


def test_spec_parses_a_strategy_table() -> None:
    adapter = TypeAdapter(StrategySpec)
    spec = adapter.validate_python({"name": "bulyan", "num_malicious_nodes": 1})
    assert isinstance(spec, BulyanParams) and spec.num_malicious_nodes == 1
    with pytest.raises(ValidationError):
        adapter.validate_python({"name": "nope"})
    with pytest.raises(ValidationError, match="num_nodes_to_select"):
        adapter.validate_python({"name": "multikrum", "num_nodes_to_select": 0})


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_build_takes_every_shown_node_and_never_waits(name: str, fake_grid) -> None:
    strategy = params_of(name).build(client_lr=0.1)
    assert isinstance(strategy, Strategy)
    for key, value in SAMPLE_ALL_SHOWN_NODES.items():
        assert getattr(strategy, key) == value, key
    assert strategy.arrayrecord_key == "arrays"
    assert strategy.weighted_by_key == "num-examples"

    node_ids = [3, 7, 11, 20, 42]
    arrays = ArrayRecord({"w": Array(np.zeros(2))})
    train = list(strategy.configure_train(1, arrays, ConfigRecord(), fake_grid(node_ids)))
    assert sorted(m.metadata.dst_node_id for m in train) == node_ids
    assert all(m.metadata.message_type == MessageType.TRAIN for m in train)
    assert all(m.content["config"]["server-round"] == 1 for m in train)
    assert all("w" in m.content["arrays"] for m in train)
    if name == "fedprox":
        assert all("proximal-mu" in m.content["config"] for m in train)
    evaluate = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), fake_grid(node_ids)))
    assert sorted(m.metadata.dst_node_id for m in evaluate) == node_ids
    # An empty view (e.g. everyone offline) gives no messages instead of waiting.
    assert list(strategy.configure_train(2, arrays, ConfigRecord(), fake_grid([]))) == []


def test_check_has_no_problems_by_default() -> None:
    assert params_of("fedavg").check(cohort_size=1) == []
    assert FedAvgParams(name="fedavg").check(cohort_size=100) == []


@pytest.mark.parametrize(("f", "too_small", "smallest_ok"), [(0, 2, 3), (1, 6, 7), (2, 10, 11)])
def test_check_bulyan_needs_4f_plus_3(f: int, too_small: int, smallest_ok: int) -> None:
    params = BulyanParams(name="bulyan", num_malicious_nodes=f)
    problems = params.check(cohort_size=too_small)
    assert [key for key, _ in problems] == ["strategy.num_malicious_nodes"]
    assert str(4 * f + 3) in problems[0][1]
    assert params.check(cohort_size=smallest_ok) == []


@pytest.mark.parametrize("cls", [KrumParams, MultiKrumParams])
@pytest.mark.parametrize(("f", "too_small", "smallest_ok"), [(0, 2, 3), (1, 4, 5), (3, 8, 9)])
def test_check_krum_needs_more_than_2f_plus_2(cls, f: int, too_small: int, smallest_ok: int):
    name = "krum" if cls is KrumParams else "multikrum"
    params = cls(name=name, num_malicious_nodes=f)
    problems = params.check(cohort_size=too_small)
    assert [key for key, _ in problems] == ["strategy.num_malicious_nodes"]
    assert params.check(cohort_size=smallest_ok) == []


def test_check_multikrum_cannot_select_more_than_reply() -> None:
    params = MultiKrumParams(name="multikrum", num_nodes_to_select=5)
    assert [key for key, _ in params.check(cohort_size=4)] == ["strategy.num_nodes_to_select"]
    assert params.check(cohort_size=5) == []
    both = MultiKrumParams(name="multikrum", num_malicious_nodes=2, num_nodes_to_select=6)
    assert {key for key, _ in both.check(cohort_size=5)} == {
        "strategy.num_malicious_nodes",
        "strategy.num_nodes_to_select",
    }
