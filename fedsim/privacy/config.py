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

DP_STEPS = "dp_steps"  # a DP-SGD client's reply metric: the noised steps it ran


class DpParams(Section):
    """Base of the DP modes."""

    # What one neighbouring change is: a client's whole data ('client') or one example
    # ('example'); delta must be below 1 over the count of such units.
    unit: ClassVar[Literal["client", "example"]] = "client"
    # Whether the coordinator adds the noise to an aggregate (its sensitivity bound then
    # needs a mean), rather than each client to what it sends.
    central: ClassVar[bool] = True
    # Whether epsilon is accounted per client (from each client's participation) rather
    # than once for the population.
    per_client: ClassVar[bool] = False

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
        "no privacy. Omit with privacy.target_epsilon to calibrate it. With adaptive "
        "clipping, the privacy cost of the update noise and the count noise together.",
    )
    clipping: Literal["fixed", "adaptive"] = Field(
        "fixed",
        description="'fixed': clip_norm every round; 'adaptive': clip_norm is the initial "
        "C_0, then C follows the target_quantile of the update norms (Andrew et al. 2021, "
        "arXiv:1905.03871).",
    )
    target_quantile: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Adaptive clipping: the fraction of updates left unclipped that C "
        "aims at (gamma; default 0.5, the median norm).",
    )
    clip_learning_rate: float | None = Field(
        None,
        gt=0,
        description="Adaptive clipping: the geometric step of C per round, "
        "C <- C exp(-eta (unclipped fraction - gamma)) (eta_C; default 0.2).",
    )
    clipped_count_stddev: float | None = Field(
        None,
        gt=0,
        description="Adaptive clipping: std of the Gaussian noise on the count of unclipped "
        "updates (sigma_b; default expected cohort / 20, as in the paper); must exceed "
        "noise_multiplier / 2.",
    )

    ADAPTIVE_KEYS: ClassVar[tuple[str, ...]] = (
        "target_quantile",
        "clip_learning_rate",
        "clipped_count_stddev",
    )

    @property
    def adaptive(self) -> bool:
        return self.clipping == "adaptive"

    def count_stddev(self, expected_cohort: float) -> float:
        """sigma_b: the given one, or the paper's default m / 20."""
        if self.clipped_count_stddev is not None:
            return self.clipped_count_stddev
        return expected_cohort / 20


@DP_MODES.register("local")
class LocalDp(DpParams):
    """Local DP: each client clips its update to clip_norm and adds N(0, (z C)^2) before sending; per-client epsilon.

    The server sees only noised updates, so any aggregation is post-processing (every
    strategy may be used). Any two datasets of a client give clipped updates up to 2C
    apart: each release is accounted as a Gaussian mechanism with sensitivity 2C, once
    per round the client takes part, without amplification by sampling."""

    central: ClassVar[bool] = False
    per_client: ClassVar[bool] = True

    mode: Literal["local"] = "local"
    clip_norm: float = Field(
        gt=0, description="L2 norm each client clips its update w - w_t to (C)."
    )
    noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="Each client's noise std over C (z); 0: clipping only, no privacy. "
        "Omit with privacy.target_epsilon to calibrate it for a client that takes part "
        "in every round.",
    )


@DP_MODES.register("sample")
class SampleDp(DpParams):
    """Record-level DP-SGD in local training (Abadi et al. 2016, arXiv:1607.00133) with Opacus; per-client epsilon.

    Poisson batches, each example's gradient clipped to ``clip_norm``, Gaussian noise of
    std ``noise_multiplier * clip_norm`` on their sum. Protects each example of a client's shard; accounted per client as the
    Poisson-subsampled Gaussian (q = 1 / ceil(n_i / B)) composed once per step that
    client ran, over every round it took part in."""

    unit: ClassVar[Literal["client", "example"]] = "example"
    central: ClassVar[bool] = False
    per_client: ClassVar[bool] = True

    mode: Literal["sample"] = "sample"
    clip_norm: float = Field(gt=0, description="L2 norm each example's gradient is clipped to (C).")
    noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="Noise std over C on each step's summed gradients (z); 0: clipping "
        "only, no privacy. Omit with privacy.target_epsilon to calibrate it for the client "
        "with the smallest shard taking part in every round.",
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
    expected_cohort: float,
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
    elif dp.unit == "client" and p.delta >= 1 / num_clients:
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
    if dp.per_client and p.stop_at_budget:
        problems.append(
            (
                "privacy.stop_at_budget",
                f"mode '{dp.mode}' accounts each client on its own: there is no run-wide "
                "budget to stop at (calibrate the noise to privacy.target_epsilon instead)",
            )
        )
    elif p.stop_at_budget and (p.target_epsilon is None or z is None):
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
    if isinstance(dp, CentralDp):
        problems += adaptive_problems(dp, z, expected_cohort)
    if isinstance(dp, (LocalDp, SampleDp)) and p.assume_sampling is not None:
        problems.append(
            (
                "privacy.assume_sampling",
                f"mode '{dp.mode}' takes no amplification from the coordinator's sampling",
            )
        )
    if dp.central and not weighted_mean:
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


def adaptive_problems(dp: CentralDp, z: float | None, m: float) -> list[tuple[str, str]]:
    if not dp.adaptive:
        return [
            (f"privacy.dp.{k}", "only with privacy.dp.clipping = 'adaptive'")
            for k in dp.ADAPTIVE_KEYS
            if getattr(dp, k) is not None
        ]
    sigma_b = dp.count_stddev(m)
    if z is not None and z > 0 and sigma_b <= z / 2:
        return [
            (
                "privacy.dp.clipped_count_stddev",
                f"{sigma_b:g} is not above noise_multiplier / 2 = {z / 2:g}: the count "
                "noise alone would cost more privacy than the whole budget allows",
            )
        ]
    return []
