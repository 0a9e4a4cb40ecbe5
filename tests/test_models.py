"""Tests for the model registry: paper parameter counts, shapes, seeding, validation."""

from __future__ import annotations

import pydantic
import pytest
import torch
from pydantic import TypeAdapter

from fedsim.models import (
    MODELS,
    CnnModel,
    LogregModel,
    MlpModel,
    ModelSpec,
    build_model,
    count_parameters,
)

SPEC = TypeAdapter(ModelSpec)


def test_cnn_has_mcmahan_parameter_count() -> None:
    # McMahan et al. 2017 (arXiv:1602.05629): 1,663,370 parameters on MNIST.
    model = CnnModel().build(input_shape=(1, 28, 28), num_classes=10)
    assert count_parameters(model) == 1_663_370


def test_mlp_default_is_2nn() -> None:
    # 784*200+200 + 200*200+200 + 200*10+10
    model = MlpModel().build(input_shape=(784,), num_classes=10)
    assert count_parameters(model) == 199_210


def test_mlp_flattens_image_input_and_empty_hidden_is_logreg() -> None:
    assert count_parameters(MlpModel().build(input_shape=(1, 28, 28), num_classes=10)) == 199_210
    assert count_parameters(MlpModel(hidden=[]).build(input_shape=(784,), num_classes=10)) == 7_850
    assert count_parameters(MlpModel(hidden=[3]).build(input_shape=(4,), num_classes=2)) == 23


def test_logreg_parameter_count() -> None:
    assert count_parameters(LogregModel().build(input_shape=(784,), num_classes=10)) == 7_850


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        (CnnModel(), (1, 8, 8)),
        (CnnModel(), (8, 8)),
        (CnnModel(), (3, 9, 5)),
        (MlpModel(), (1, 8, 8)),
        (MlpModel(hidden=[16]), (60,)),
        (LogregModel(), (1, 8, 8)),
        (LogregModel(), (60,)),
    ],
)
def test_forward_shape(spec: CnnModel | MlpModel | LogregModel, shape: tuple[int, ...]) -> None:
    model = build_model(spec, input_shape=shape, num_classes=7, seed=0)
    out = model(torch.zeros(5, *shape))
    assert out.shape == (5, 7)


def test_cnn_on_8x8_flattens_to_2x2x64() -> None:
    model = CnnModel().build(input_shape=(1, 8, 8), num_classes=10)
    dense = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][0]
    assert dense.in_features == 2 * 2 * 64


@pytest.mark.parametrize("shape", [(60,), (1, 2, 3, 4)])
def test_cnn_rejects_non_image_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="cnn"):
        CnnModel().build(input_shape=shape, num_classes=10)


def test_cnn_rejects_too_small_images() -> None:
    with pytest.raises(ValueError, match="4x4"):
        CnnModel().build(input_shape=(1, 3, 8), num_classes=10)


def test_bad_dims_rejected() -> None:
    with pytest.raises(ValueError, match="input_shape"):
        LogregModel().build(input_shape=(), num_classes=10)
    with pytest.raises(ValueError, match="input_shape"):
        LogregModel().build(input_shape=(0,), num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        LogregModel().build(input_shape=(4,), num_classes=1)


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn"])
def test_seeded_build_is_deterministic(name: str) -> None:
    kw = {"input_shape": (1, 8, 8), "num_classes": 10}
    a = _weights(build_model(name, seed=3, **kw))
    b = _weights(build_model(name, seed=3, **kw))
    c = _weights(build_model(name, seed=4, **kw))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, z) for x, z in zip(a, c, strict=True))


def test_seeded_build_leaves_global_rng_unchanged() -> None:
    before = torch.random.get_rng_state()
    build_model(CnnModel(), input_shape=(1, 28, 28), num_classes=10, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_seeded_build_ignores_global_rng_state() -> None:
    torch.random.manual_seed(123)
    a = _weights(build_model("mlp", input_shape=(10,), num_classes=3, seed=9))
    torch.random.manual_seed(456)
    b = _weights(build_model("mlp", input_shape=(10,), num_classes=3, seed=9))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_unseeded_build_draws_from_global_rng() -> None:
    before = torch.random.get_rng_state()
    build_model("logreg", input_shape=(4,), num_classes=2)
    assert not torch.equal(torch.random.get_rng_state(), before)


def test_unknown_model_name_lists_known() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet'; known: cnn, logreg, mlp"):
        MODELS.get("resnet")
    with pytest.raises(ValueError, match="known: cnn, logreg, mlp"):
        build_model("resnet", input_shape=(4,), num_classes=2)
    # The scenario schema rejects it too, naming the expected tags.
    with pytest.raises(pydantic.ValidationError, match="'cnn', 'logreg', 'mlp'"):
        SPEC.validate_python({"name": "resnet"})


def test_registry_matches_spec_union() -> None:
    assert MODELS.names() == ["cnn", "logreg", "mlp"]
    for name in MODELS.names():
        assert type(SPEC.validate_python({"name": name})) is MODELS.get(name)


def test_spec_parses_from_table() -> None:
    spec = SPEC.validate_python({"name": "mlp", "hidden": [64, 32]})
    assert spec == MlpModel(hidden=[64, 32])


@pytest.mark.parametrize(
    "table",
    [
        {"name": "mlp", "hidden": [0]},
        {"name": "mlp", "hidden": [200, -1]},
        {"name": "mlp", "width": 3},
        {"name": "cnn", "channels": 3},
        {"name": "logreg", "hidden": [10]},
    ],
)
def test_spec_rejects_bad_tables(table: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        SPEC.validate_python(table)


def test_spec_rejects_bad_direct_construction() -> None:
    with pytest.raises(pydantic.ValidationError):
        MlpModel(hidden=[0])
    with pytest.raises(pydantic.ValidationError):
        MlpModel(layers=2)  # type: ignore[call-arg]


def test_spec_fields_have_descriptions() -> None:
    for cls in MODELS.values():
        for field_name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{field_name} has no description"
