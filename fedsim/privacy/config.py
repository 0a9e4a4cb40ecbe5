"""The ``[privacy]`` table: differential privacy mechanism, accountant and budget.

``[privacy.dp]`` selects a registered mechanism by ``mode`` (``none`` by default), like
the other variant tables; the accountant, delta and budget sit in ``[privacy]`` itself.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from fedsim.privacy.accounting import Accountant
from fedsim.registry import Registry, Variants
from fedsim.sections import Section


class DpParams(Section):
    """Base of the DP modes."""

    # Whether the mechanism protects a client's whole contribution (user level, one
    # accounting for the run) rather than its examples or per client.
    user_level: ClassVar[bool] = True

    mode: str = Field(description="DP mechanism ('none': no differential privacy).")

    @property
    def active(self) -> bool:
        return self.mode != "none"


DP_MODES: Registry[type[DpParams]] = Registry("DP mode", key="mode", default="none")


@DP_MODES.register("none")
class NoDp(DpParams):
    """No differential privacy."""

    mode: Literal["none"] = "none"


@DP_MODES.register("central")
class CentralDp(DpParams):
    """User-level DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963): clipped updates, equal weights, the expected cohort as denominator, Gaussian noise once at the coordinator.

    ("Learning Differentially Private Recurrent Language Models".) Each client's update
    is clipped to L2 norm ``clip_norm``, the clipped updates are summed with equal
    weights and divided by the expected cohort m (fixed denominator), and Gaussian noise
    of std ``noise_multiplier * clip_norm / m`` is added once, at the coordinator."""  # noqa: E501

    mode: Literal["central"] = "central"
    clip_norm: float = Field(
        gt=0, description="L2 norm each client's update w - w_t is clipped to (C)."
    )
    noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="Noise std over the clipped sum's sensitivity (z); 0: clipping only, "
        "no privacy. Omit with privacy.target_epsilon to calibrate it.",
    )


class PrivacySection(Section):
    """Privacy settings: a DP mechanism (``[privacy.dp]``) and how it is accounted."""

    dp: Annotated[DpParams, Variants(DP_MODES)] = Field(
        default_factory=lambda: DP_MODES.default_params(),
        description="The differential privacy mechanism; a table with a 'mode' key.",
    )
    accountant: Accountant = Field(
        "rdp",
        description="Privacy accountant of Google's dp-accounting: 'rdp' (Renyi DP, fast) "
        "or 'pld' (privacy loss distributions, tighter, slower; Poisson sampling or no "
        "amplification only).",
    )
    delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="The delta of (epsilon, delta)-DP; required with DP, below "
        "1/data.num_clients for user-level DP.",
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="Privacy budget: without privacy.dp.noise_multiplier, the noise "
        "multiplier is calibrated so run.rounds rounds spend exactly this epsilon.",
    )
    stop_at_budget: bool = Field(
        False,
        description="With target_epsilon and a fixed noise multiplier: stop the run before "
        "the round that would exceed the budget.",
    )
    assume_sampling: Literal["poisson", "fixed"] | None = Field(
        None,
        description="Account with the amplification of this sampling even though churn "
        "(availability, dropout, membership) means the sampling was not uniform over the "
        "population: an assumption, warned about. Default: no amplification under churn.",
    )

    @property
    def active(self) -> bool:
        return self.dp.active


def check_privacy(
    p: PrivacySection,
    *,
    num_clients: int,
    weighted_mean: bool,
    strategy: str,
    mean_strategies: list[str],
) -> list[tuple[str, str]]:
    """The privacy settings' own consistency and what they need of the rest of the
    scenario, as (key path, message) problems."""
    problems: list[tuple[str, str]] = []
    dp = p.dp
    if not dp.active:
        for key in ("delta", "target_epsilon", "assume_sampling"):
            if getattr(p, key) is not None:
                problems.append((f"privacy.{key}", "needs privacy.dp (a mode other than 'none')"))
        if p.stop_at_budget:
            problems.append(("privacy.stop_at_budget", "needs privacy.dp"))
        return problems
    z = getattr(dp, "noise_multiplier", None)
    if p.delta is None:
        problems.append(("privacy.delta", "required with privacy.dp"))
    elif dp.user_level and p.delta >= 1 / num_clients:
        problems.append(
            (
                "privacy.delta",
                f"{p.delta:g} is not below 1/data.num_clients = {1 / num_clients:g}: a "
                "mechanism that reveals one client's data outright would satisfy it",
            )
        )
    if p.target_epsilon is None and z is None:
        problems.append(
            ("privacy.dp.noise_multiplier", "required (or give privacy.target_epsilon)")
        )
    if p.stop_at_budget and (p.target_epsilon is None or z is None):
        problems.append(
            (
                "privacy.stop_at_budget",
                "needs privacy.target_epsilon and a fixed privacy.dp.noise_multiplier",
            )
        )
    if p.target_epsilon is not None and z is not None and not p.stop_at_budget:
        problems.append(
            (
                "privacy.target_epsilon",
                "cannot be given with a fixed privacy.dp.noise_multiplier (omit one, or set "
                "privacy.stop_at_budget = true to stop the run at the budget)",
            )
        )
    if p.target_epsilon is not None and z == 0:
        problems.append(("privacy.target_epsilon", "no epsilon is reached without noise"))
    if dp.user_level and not weighted_mean:
        problems.append(
            (
                "strategy.name",
                f"'{strategy}' does not aggregate by a weighted mean: its aggregate (a median, "
                "a selection) has no sensitivity bound of C/m for one client's update, so "
                "the noise would not give the accounted privacy; use one of "
                + ", ".join(mean_strategies),
            )
        )
    return problems
