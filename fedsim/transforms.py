"""Update transforms: what happens to a client's update ``w - w_t`` before it is folded,
and to the mean update once, before it becomes the new model.

A scenario's ``transforms`` is a list of tables, each selecting a registered transform by
``kind``; they run in that order. A per-update transform (``UpdateTransform``) runs in the
worker that ran the client, before the update enters the pre-folded sums (or, on
Flower's runtime and real SuperNodes, at the coordinator, in the same order on the same
numbers, so both engines still give bit-identical models). It may change the update
(clip it) or reject the client with a reason (``Rejected``): the client then counts as
``rejected:<reason>`` in ``participation.csv`` and is left out of the aggregate. An
aggregate transform (``AggregateTransform``) runs once per round at the coordinator on
the weighted mean update (e.g. noise for central DP).

Pure numpy: randomness comes from the ``rng`` of the context, derived from the run seed,
the round, the client and the transform's position, never from global state.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
from pydantic import Field

from fedsim.registry import Registry
from fedsim.rng import np_rng
from fedsim.sections import Section

Update = dict[str, np.ndarray]


class Rejected(Exception):
    """A per-update transform refuses a client's update; the message is the reason."""


@dataclass
class UpdateContext:
    """Where an update comes from, for transforms that depend on it."""

    seed: int
    server_round: int
    cid: int  # the client (-1 at the coordinator, for an aggregate transform)
    weight: float  # the update's weight in the mean (num-examples; the total, aggregated)
    position: int = 0  # the transform's position in the chain
    # What transforms report about this update (e.g. dp_clipped), added to its metrics.
    notes: dict[str, float] = field(default_factory=dict)
    # The round's config as the coordinator sent it (e.g. an adaptive clip norm).
    config: Mapping[str, Any] = field(default_factory=dict)

    @cached_property
    def rng(self) -> np.random.Generator:
        if self.cid < 0:  # the aggregate, at the coordinator
            return np_rng(self.seed, "transform-aggregate", self.server_round, self.position)
        return np_rng(self.seed, "transform", self.server_round, self.cid, self.position)


class UpdateTransform(Section, ABC):
    """A transform of each client's update, in the worker, before folding."""

    @abstractmethod
    def apply(self, update: Update, ctx: UpdateContext) -> Update:
        """The transformed update (may modify ``update`` in place); raise Rejected."""


class AggregateTransform(Section, ABC):
    """A transform of the round's mean update, once, at the coordinator."""

    @abstractmethod
    def apply(self, mean: Update, ctx: UpdateContext) -> Update:
        """The transformed mean update (may modify ``mean`` in place)."""


TRANSFORMS: Registry[type[Section]] = Registry("update transform", key="kind")


def l2_norm(update: Update) -> float:
    """The L2 norm of an update over all its arrays (squares summed in float64)."""
    return math.sqrt(sum(float(np.vdot(a, a).real) for a in update.values()))


@TRANSFORMS.register("clip_norm")
class ClipNorm(UpdateTransform):
    """Scale each client's update down to an L2 norm of at most max_norm.

    Norm bounding (Sun et al. 2019, "Can You Really Backdoor Federated Learning?",
    arXiv:1911.07963); the clipping step of DP-FedAvg (McMahan et al. 2018,
    arXiv:1710.06963).
    """

    kind: Literal["clip_norm"] = Field("clip_norm", description="Clip the update's L2 norm.")
    max_norm: float = Field(gt=0, description="Largest L2 norm of an update, over all arrays.")

    def apply(self, update: Update, ctx: UpdateContext) -> Update:
        norm = l2_norm(update)
        if norm > self.max_norm:
            for a in update.values():
                a *= a.dtype.type(self.max_norm / norm)
        return update


@TRANSFORMS.register("norm_bound")
class NormBound(UpdateTransform):
    """Reject a client whose update's L2 norm exceeds max_norm (a boosted or broken update)."""

    kind: Literal["norm_bound"] = Field("norm_bound", description="Reject large updates.")
    max_norm: float = Field(gt=0, description="Largest L2 norm of an accepted update.")

    def apply(self, update: Update, ctx: UpdateContext) -> Update:
        norm = l2_norm(update)
        if not norm <= self.max_norm:  # NaN is rejected too
            raise Rejected(f"update norm {norm:.4g} > {self.max_norm:g}")
        return update


@dataclass(frozen=True)
class Chains:
    """A scenario's transforms, split by where they run."""

    update: tuple[UpdateTransform, ...] = ()
    aggregate: tuple[AggregateTransform, ...] = ()
    seed: int = 0
    # Every accepted update weighs 1 in the mean (and in the metrics' mean) instead of
    # its num-examples: DP-FedAvg's equal weights, which keep one client's influence
    # bounded by its clipped norm.
    equal_weights: bool = False

    @classmethod
    def of(cls, transforms: list[Section], *, seed: int, equal_weights: bool = False) -> Chains:
        return cls(
            tuple(t for t in transforms if isinstance(t, UpdateTransform)),
            tuple(t for t in transforms if isinstance(t, AggregateTransform)),
            seed,
            equal_weights,
        )

    def weight(self, num_examples: float) -> float:
        """An accepted update's weight in the mean."""
        return 1.0 if self.equal_weights else num_examples

    def screen(
        self,
        update: Update,
        *,
        server_round: int,
        cid: int,
        weight: float,
        notes: dict[str, float] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> Update:
        """Run the per-update chain (raises Rejected); what the transforms report about
        the update goes into ``notes``; ``config``: the round's config as sent."""
        notes = {} if notes is None else notes
        for i, t in enumerate(self.update):
            ctx = UpdateContext(self.seed, server_round, cid, weight, i, notes, config or {})
            update = t.apply(update, ctx)
        return update

    def finish(
        self,
        mean: Update,
        *,
        server_round: int,
        weight: float,
        config: Mapping[str, Any] | None = None,
    ) -> Update:
        """Run the aggregate chain on the mean update (``config``: the round's, as sent)."""
        for i, t in enumerate(self.aggregate):
            ctx = UpdateContext(self.seed, server_round, -1, weight, i, config=config or {})
            mean = t.apply(mean, ctx)
        return mean
