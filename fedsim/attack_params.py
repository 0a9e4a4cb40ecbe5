"""The ``[attack]`` table: which clients are malicious and what they send.

For robustness research: a fixed set of the population, drawn from the run seed
(``fraction`` of it, or ``count`` clients), attacks in every round it is selected in;
attackers keep the schedule, churn and system model of honest clients. The attack
``kind`` selects a registered parameter class; the built-in ones live in
``clients.attacks``:

- *local* attacks act in the attacking client: they poison its data before training
  (``poison``) or turn its honestly trained update into another one (``craft``);
- *omniscient* attacks (``omniscient = True``) craft one malicious update from the
  round's honest updates (``craft_round``). In simulation the coordinator gives them
  those updates: it collects every training reply of the round unfolded, replaces the
  attackers' replies before any validation, transform or aggregation sees them, and
  only then screens and folds (as it does under Flower's runtime), so both engines give
  the same model.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from fedsim.registry import Registry
from fedsim.rng import np_rng
from fedsim.sections import Section

Update = dict[str, np.ndarray]


class AttackParams(Section):
    """Base of the attack kinds: who attacks (the same for every kind)."""

    # The attack needs the round's honest updates (crafted at the coordinator).
    omniscient: ClassVar[bool] = False

    kind: str = Field(description="Registered attack ('none': every client is honest).")
    fraction: float = Field(
        0.0, ge=0, le=1, description="Fraction of the population that is malicious."
    )
    count: int | None = Field(
        None, ge=0, description="Number of malicious clients (instead of fraction)."
    )

    def num_attackers(self, num_clients: int) -> int:
        if self.count is not None:
            return min(self.count, num_clients)
        return int(round(self.fraction * num_clients))

    def attackers(self, num_clients: int, seed: int) -> np.ndarray:
        """The malicious client ids (sorted), drawn from the run seed."""
        k = self.num_attackers(num_clients)
        if k == 0:
            return np.zeros(0, np.int64)
        rng = np_rng(seed, "attack.clients")
        return np.sort(rng.choice(num_clients, size=k, replace=False)).astype(np.int64)

    @property
    def active(self) -> bool:
        return self.kind != "none"

    # --- what an attacker does (overridden by the kinds) -------------------------------

    def poison(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, ...]:
        """The attacker's training data (data poisoning); unchanged by default."""
        return x, y

    def craft(self, update: Update, rng: np.random.Generator) -> Update | None:
        """The update an attacker sends instead of its honest ``update`` (None: the
        honest one)."""
        return None

    def craft_round(
        self, honest: list[Update], num_attackers: int, cohort: int, rng: np.random.Generator
    ) -> Update | None:
        """For omniscient attacks: the update every attacker of the round sends, from
        the round's honest updates (``num_attackers`` of the ``cohort`` replies are
        malicious)."""
        return None


ATTACKS: Registry[type[AttackParams]] = Registry("attack", key="kind", default="none")


@ATTACKS.register("none")
class NoAttack(AttackParams):
    """Every client is honest."""

    kind: Literal["none"] = Field("none", description="No attack: every client is honest.")
