"""Model registry: the networks a scenario can train, by name.

Each entry is a parameter block (a scenario ``[model]`` table, discriminated by ``name``)
whose ``build`` makes a fresh ``torch.nn.Module`` for a given input shape and class count.
Every model outputs unnormalised logits; the loss (cross-entropy) lives with training.

- ``logreg``: multinomial logistic regression, one linear layer on the flattened input.
- ``mlp``: the "2NN" of McMahan et al., "Communication-Efficient Learning of Deep
  Networks from Decentralized Data", AISTATS 2017, arXiv:1602.05629: fully connected
  layers with ReLU; 784-200-200-10 has 199,210 parameters.
- ``cnn``: the CNN of the same paper: two 5x5 convolutions (32, 64 channels, each
  followed by ReLU and 2x2 max pooling), a 512-unit dense ReLU layer and a linear
  output; 1,663,370 parameters on 28x28 MNIST with 10 classes. The paper does not state
  the padding; "same" padding is the reading that gives its parameter count.

Weight initialisation is PyTorch's default for each layer. ``build_model(..., seed=s)``
makes it a function of the run's root seed without leaving the global torch generator
changed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from fedsim.registry import Registry, Variants
from fedsim.rng import int_seed
from fedsim.sections import Section

__all__ = [
    "MODELS",
    "CnnModel",
    "LogregModel",
    "MlpModel",
    "ModelParams",
    "ModelSpec",
    "build_model",
    "count_parameters",
]


class ModelParams(Section, ABC):
    """Base of every model parameter block: ``name`` selects it, ``build`` makes the net."""

    @abstractmethod
    def build(self, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        """A freshly initialised module mapping ``(N, *input_shape)`` to ``(N, num_classes)``."""


MODELS: Registry[type[ModelParams]] = Registry("model", key="name", default="mlp")


def _check_dims(input_shape: tuple[int, ...], num_classes: int) -> tuple[int, ...]:
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input_shape must be non-empty with positive sizes, got {input_shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return shape


@MODELS.register("logreg")
class LogregModel(ModelParams):
    """Multinomial logistic regression: flatten, then one linear layer to the logits."""

    name: Literal["logreg"] = Field(
        "logreg", description="Multinomial logistic regression (one linear layer)."
    )

    def build(self, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        shape = _check_dims(input_shape, num_classes)
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), num_classes))


@MODELS.register("mlp")
class MlpModel(ModelParams):
    """Fully connected ReLU network (McMahan et al. 2017's "2NN" with the default sizes)."""

    name: Literal["mlp"] = Field("mlp", description="Multilayer perceptron with ReLU.")
    hidden: list[Annotated[int, Field(ge=1)]] = Field(
        [200, 200],
        description=(
            "Width of each hidden layer, input side first; an empty list is logistic "
            "regression. [200, 200] is the 2NN of McMahan et al. 2017 (arXiv:1602.05629)."
        ),
    )

    def build(self, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        shape = _check_dims(input_shape, num_classes)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(shape)
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)


@MODELS.register("cnn")
class CnnModel(ModelParams):
    """The CNN of McMahan et al. 2017 (arXiv:1602.05629) for (C, H, W) images."""

    name: Literal["cnn"] = Field(
        "cnn",
        description=(
            "CNN of McMahan et al. 2017: conv5x5(32)-pool-conv5x5(64)-pool-dense(512)-out. "
            "Needs image inputs (C, H, W) or (H, W), at least 4x4."
        ),
    )

    def build(self, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        shape = _check_dims(input_shape, num_classes)
        if len(shape) == 2:
            # A bare (H, W) image is one channel: (N, H, W) -> (N, 1, H, W).
            layers: list[nn.Module] = [nn.Unflatten(1, (1, shape[0]))]
            shape = (1, *shape)
        elif len(shape) == 3:
            layers = []
        else:
            raise ValueError(
                f"model 'cnn' needs image input of shape (C, H, W) or (H, W), got {input_shape}; "
                "use 'mlp' or 'logreg' for flat features"
            )
        channels, height, width = shape
        # Each 2x2 max pool floors the spatial size; two of them divide it by 4.
        out_h, out_w = height // 4, width // 4
        if out_h < 1 or out_w < 1:
            raise ValueError(f"model 'cnn' needs images of at least 4x4, got {height}x{width}")
        layers += [
            nn.Conv2d(channels, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * out_h * out_w, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        ]
        return nn.Sequential(*layers)


# The [model] table: a union of every registered model, built from the registry.
ModelSpec = Annotated[ModelParams, Variants(MODELS)]
"""A scenario ``[model]`` table: one of the registered parameter blocks, chosen by ``name``."""


#: The largest model fedsim builds (scalar parameters): 2^30, 4 GiB in float32 per copy,
#: and every worker, the coordinator and the strategy each hold copies.
MAX_PARAMETERS = 2**30


def planned_parameters(spec: ModelParams, *, input_shape: tuple[int, ...], num_classes: int) -> int:
    """The model's parameter count, found by building it on torch's "meta" device: shapes
    only, nothing allocated (a 1e11-wide layer costs nothing to count)."""
    with torch.device("meta"):
        return count_parameters(spec.build(input_shape=input_shape, num_classes=num_classes))


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters (trainable or not) in ``module``."""
    return sum(p.numel() for p in module.parameters())


def build_model(
    spec: ModelParams | str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int | None = None,
) -> nn.Module:
    """Build the model ``spec`` describes (a parameter block, or a name for its defaults).

    With ``seed`` the initial weights are a function of it alone: construction runs under a
    forked CPU generator seeded from ``int_seed(seed, "init")``, so the global torch RNG is
    the same afterwards. Without ``seed`` the weights come from the global generator.
    """
    if isinstance(spec, str):
        spec = MODELS.get(spec)()
    if seed is None:
        return spec.build(input_shape=input_shape, num_classes=num_classes)
    # Pinning what torch.nn.init reads is the one allowed touch of the global RNG. Only the
    # CPU default generator is seeded (not torch.manual_seed, which would also reseed CUDA
    # outside the fork); modules are built on the CPU.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int_seed(seed, "init"))
        return spec.build(input_shape=input_shape, num_classes=num_classes)
