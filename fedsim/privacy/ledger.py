"""A run's privacy ledger: which event the accountant is told, epsilon after each
round, the budget, and what the summary says about it.

Central DP accounts once per round for the whole population (user level): every round
is one application of the mechanism to whoever was sampled, so epsilon after r rounds is
``epsilon(event, r)``, whether or not a given client took part. The event follows the
sampling the coordinator actually performs (``fedsim.privacy.accounting``); under churn
(availability, dropout, membership) the cohort is drawn among the clients online at the
time, not uniformly from the population, so no amplification is assumed unless the user
opts in with ``privacy.assume_sampling``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedsim.privacy.accounting import Mechanism, calibrate, epsilon

if TYPE_CHECKING:
    from fedsim.scenario import Scenario

log = logging.getLogger("fedsim")

ASSUMPTIONS = {
    "poisson": "Poisson sampling: each client joins a round independently with probability "
    "q (add/remove-one neighbours)",
    "fixed": "fixed-size sampling: k of N clients uniformly without replacement "
    "(replace-one neighbours)",
    "none": "no amplification by sampling: every round counts in full for every client",
}


@dataclass(frozen=True)
class Ledger:
    accountant: str
    delta: float
    mechanism: Mechanism
    clip_norm: float
    assumption: str  # 'poisson', 'fixed' or 'none'
    assumed_under_churn: bool = False
    calibrated: bool = False
    target_epsilon: float | None = None
    stop_at_budget: bool = False

    @classmethod
    def of(cls, scn: Scenario, *, noise_multiplier: float | None = None) -> Ledger | None:
        """The ledger of the scenario's DP mechanism (None without DP); with
        ``target_epsilon`` and no noise multiplier, the one that spends the budget."""
        p = scn.privacy
        dp: Any = p.dp
        if not p.active:
            return None
        churn = scn.churn.active
        sampling = scn.coordinator.sampling
        assumption = (p.assume_sampling or "none") if churn else sampling
        n = scn.num_clients
        k = min(math.ceil(scn.train_cohort * scn.coordinator.over_commit - 1e-9), n)

        def make(z: float) -> Mechanism:
            if assumption == "poisson":
                return Mechanism(z, "poisson", q=k / n)
            if assumption == "fixed":
                return Mechanism(z, "fixed", k=k, n=n)
            return Mechanism(z, "none")

        z = noise_multiplier if noise_multiplier is not None else dp.noise_multiplier
        if z is None:
            z = calibrate(p.accountant, make, scn.run.rounds, p.delta, p.target_epsilon)
        # (a target with a fixed z is refused unless it is a stopping budget, so a
        # target without stop_at_budget means z was, or will be, calibrated)
        calibrated = p.target_epsilon is not None and not p.stop_at_budget
        if churn and p.assume_sampling is not None:
            log.warning(
                "privacy.assume_sampling = '%s': epsilon assumes amplification by sampling "
                "although churn means the cohort is drawn among the clients online, not "
                "uniformly from the population",
                p.assume_sampling,
            )
        return cls(
            accountant=p.accountant,
            delta=p.delta,
            mechanism=make(z),
            clip_norm=dp.clip_norm,
            assumption=assumption,
            assumed_under_churn=churn and p.assume_sampling is not None,
            calibrated=calibrated,
            target_epsilon=p.target_epsilon,
            stop_at_budget=p.stop_at_budget,
        )

    @property
    def noise_multiplier(self) -> float:
        return self.mechanism.noise_multiplier

    def epsilon(self, rounds: int) -> float:
        """Epsilon at delta after ``rounds`` rounds."""
        return epsilon(self.accountant, self.mechanism, rounds, self.delta)  # type: ignore[arg-type]

    def max_rounds(self, rounds: int) -> int:
        """The rounds the run may take: all of them, or with ``stop_at_budget`` the
        most whose epsilon stays within the target (epsilon grows with rounds)."""
        if not self.stop_at_budget or self.target_epsilon is None:
            return rounds
        if self.epsilon(rounds) <= self.target_epsilon:
            return rounds
        lo, hi = 0, rounds  # epsilon(lo) <= target < epsilon(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon(mid) <= self.target_epsilon:
                lo = mid
            else:
                hi = mid
        return lo

    def summary(self, records: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
        """What summary.json says about privacy."""
        done = len(records)
        m = self.mechanism
        clipped = [r.get("dp_clipped_fraction") for r in records]
        return {
            "dp_mode": "central",
            "dp_epsilon": self.epsilon(done),
            "dp_delta": self.delta,
            "dp_accountant": self.accountant,
            "dp_sampling_assumption": self.assumption,
            "dp_sampling_assumption_text": ASSUMPTIONS[self.assumption]
            + (
                " (assumed by privacy.assume_sampling despite churn)"
                if self.assumed_under_churn
                else ""
            ),
            "dp_sampling_rate": m.q
            if self.assumption == "poisson"
            else (m.k / m.n if self.assumption == "fixed" else None),
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_noise_multiplier_calibrated": self.calibrated,
            "dp_clip_norm": self.clip_norm,
            "dp_target_epsilon": self.target_epsilon,
            "dp_stopped_at_budget": self.stop_at_budget and done < rounds,
            "dp_clipped_fraction_per_round": clipped,
        }


def calibrated(scn: Scenario) -> tuple[Scenario, float | None]:
    """The scenario with its noise multiplier calibrated to privacy.target_epsilon
    (where it asks for that), and the calibrated z (None when nothing was calibrated)."""
    dp: Any = scn.privacy.dp
    if not scn.privacy.active or dp.noise_multiplier is not None:
        return scn, None
    ledger = Ledger.of(scn)
    assert ledger is not None
    z = ledger.noise_multiplier
    new_dp = dp.model_copy(update={"noise_multiplier": z})
    privacy = scn.privacy.model_copy(update={"dp": new_dp})
    return scn.model_copy(update={"privacy": privacy}), z
