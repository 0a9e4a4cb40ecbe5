"""Attack clients for robustness research, configured by ``[attack]``.

Each kind is a registered ``fedsim.attack_params.AttackParams`` (see there for who
attacks and how omniscient attacks get the round's honest updates):

- ``sign_flip``: send the honest update negated (``-u``);
- ``scale``: send the honest update boosted by ``factor`` (model replacement, Bagdasaryan
  et al. 2020, arXiv:1807.00459; boosting, Bhagoji et al. 2019, arXiv:1811.12470);
- ``gaussian``: send a random update, each coordinate drawn from N(0, ``std``^2)
  (Blanchard et al. 2017, arXiv:1703.02757);
- ``label_flip``: train honestly on poisoned labels ``y -> C - 1 - y`` (data poisoning,
  Fang et al. 2020, arXiv:1911.11815);
- ``alie``: "A little is enough" (Baruch et al. 2019, arXiv:1902.06156): every attacker
  sends ``mu - z * sigma``, the per-coordinate mean and standard deviation of the round's
  honest updates, with ``z`` the paper's ``z_max`` for ``n`` replies of which ``m`` are
  malicious unless set;
- ``ipm``: inner product manipulation (Xie et al. 2019, arXiv:1903.03936): every
  attacker sends ``-epsilon`` times the mean of the round's honest updates.

Updates are ``w - w_t`` per floating array; integer buffers stay as trained. Random
draws come from the run seed, the round and the client.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from fedsim.attack_params import ATTACKS, AttackParams, Update

__all__ = ["Alie", "Gaussian", "Ipm", "LabelFlip", "Scale", "SignFlip", "alie_z"]

_WHO = "Malicious clients: 'fraction' of the population or 'count', drawn from the seed."


@ATTACKS.register("sign_flip")
class SignFlip(AttackParams):
    """Send the honest update negated."""

    kind: Literal["sign_flip"] = Field("sign_flip", description=_WHO)

    def craft(self, update: Update, rng: np.random.Generator) -> Update:
        return {k: np.negative(d) for k, d in update.items()}


@ATTACKS.register("scale")
class Scale(AttackParams):
    """Send the honest update boosted by a factor."""

    kind: Literal["scale"] = Field("scale", description=_WHO)
    factor: float = Field(100.0, gt=0, description="Boosting factor of the update.")

    def craft(self, update: Update, rng: np.random.Generator) -> Update:
        return {k: d * d.dtype.type(self.factor) for k, d in update.items()}


@ATTACKS.register("gaussian")
class Gaussian(AttackParams):
    """Send a random update, each coordinate from N(0, std^2)."""

    kind: Literal["gaussian"] = Field("gaussian", description=_WHO)
    std: float = Field(1.0, gt=0, description="Standard deviation of each coordinate.")

    def craft(self, update: Update, rng: np.random.Generator) -> Update:
        return {
            k: rng.normal(0.0, self.std, size=d.shape).astype(d.dtype) for k, d in update.items()
        }


@ATTACKS.register("label_flip")
class LabelFlip(AttackParams):
    """Train honestly on flipped labels y -> C - 1 - y."""

    kind: Literal["label_flip"] = Field("label_flip", description=_WHO)

    def poison(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, ...]:
        return x, (num_classes - 1 - y).astype(y.dtype)


def alie_z(cohort: int, attackers: int) -> float:
    """Baruch et al.'s z_max: s = floor(n/2 + 1) - m honest replies must look like the
    majority, z = Phi^-1((n - s) / n)."""
    s = math.floor(cohort / 2 + 1) - attackers
    p = (cohort - s) / cohort if cohort else 0.5
    p = min(max(p, 1e-6), 1 - 1e-6)
    return NormalDist().inv_cdf(p)


@ATTACKS.register("alie")
class Alie(AttackParams):
    """'A little is enough': mu - z * sigma of the round's honest updates."""

    omniscient: ClassVar[bool] = True

    kind: Literal["alie"] = Field("alie", description=_WHO)
    z: float | None = Field(
        None,
        description="Standard deviations to shift by (default: the paper's z_max for the "
        "round's replies and attackers).",
    )

    def craft_round(
        self, honest: list[Update], num_attackers: int, cohort: int, rng: np.random.Generator
    ) -> Update | None:
        if not honest:
            return None
        z = self.z if self.z is not None else alie_z(cohort, num_attackers)
        out = {}
        for k in honest[0]:
            stack = np.stack([u[k] for u in honest]).astype(np.float64)
            out[k] = (stack.mean(axis=0) - z * stack.std(axis=0)).astype(honest[0][k].dtype)
        return out


@ATTACKS.register("ipm")
class Ipm(AttackParams):
    """Inner product manipulation: -epsilon times the mean honest update."""

    omniscient: ClassVar[bool] = True

    kind: Literal["ipm"] = Field("ipm", description=_WHO)
    epsilon: float = Field(0.5, gt=0, description="Scale of the negated honest mean.")

    def craft_round(
        self, honest: list[Update], num_attackers: int, cohort: int, rng: np.random.Generator
    ) -> Update | None:
        if not honest:
            return None
        out = {}
        for k in honest[0]:
            mean = np.mean(np.stack([u[k] for u in honest]).astype(np.float64), axis=0)
            out[k] = (-self.epsilon * mean).astype(honest[0][k].dtype)
        return out
