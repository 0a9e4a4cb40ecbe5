"""The DP mechanisms as update transforms, so both engines run them where every other
transform runs: clipping in the worker that ran the client (before its update enters
the pre-folded sums; at the coordinator under Flower's runtime), noise once at the
coordinator on the mean, drawn from the root seed.

Central DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963), with the fixed-denominator
estimator: the fold averages the clipped updates with equal weights over the n clients
that replied; ``GaussianSum`` turns that mean into the sum over the expected cohort m
(times n / m) and adds N(0, (z C / m)^2) to every coordinate. Adding or removing one
client moves the sum by at most C whatever the realised cohort, so the sensitivity of
the released average is C / m and the noise std is z times it.

Adaptive clipping (Andrew et al. 2021, arXiv:1905.03871): the clip norm C_t of round t
is the coordinator's state (``AdaptiveClip``); it goes to the cohort in the round's
config (``CLIP_KEY``), where ``DpClip`` and ``GaussianSum`` read it. Each client notes
whether its update was clipped; the coordinator counts the unclipped ones, centred
(b_i - 1/2, sensitivity 1/2), adds N(0, sigma_b^2), divides by m and steps
C_{t+1} = C_t exp(-eta_C (b - gamma)), the geometric update of the paper. The update
noise is z_delta C_t / m with z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), so the two
releases together cost what one Gaussian with multiplier z costs and the accountant is
told z (Theorem 1 there; the same holds under replace-one neighbouring, where both
sensitivities double).

Why equal weights: with num-examples weights, one client's share of the mean is
n_i / sum_j n_j, which a client with many examples (or a lying one) drives towards 1:
no bound on one client's influence short of bounding n_i, so the sensitivity C/m fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from fedsim.rng import np_rng
from fedsim.transforms import AggregateTransform, Update, UpdateContext, UpdateTransform, l2_norm

CLIPPED = "dp_clipped"  # the note: 1.0 when the update was scaled down, else 0.0
CLIP_KEY = "dp-clip-norm"  # the round's clip norm in the config (adaptive clipping)


def _clip_norm(ctx: UpdateContext, default: float) -> float:
    value = ctx.config.get(CLIP_KEY)
    return default if value is None else float(value)


class DpClip(UpdateTransform):
    """Clip a client's update to L2 norm ``clip_norm`` (and note whether it was)."""

    kind: Literal["dp_clip"] = "dp_clip"
    clip_norm: float = Field(gt=0)

    def apply(self, update: Update, ctx: UpdateContext) -> Update:
        ctx.notes[CLIPPED] = float(clip(update, _clip_norm(ctx, self.clip_norm)))
        return update


def clip(update: Update, clip_norm: float) -> bool:
    """Scale ``update`` in place to L2 norm at most ``clip_norm``; whether it was."""
    norm = l2_norm(update)
    clipped = norm > clip_norm
    if clipped:
        for a in update.values():
            a *= a.dtype.type(clip_norm / norm)
    return clipped


def add_gaussian(
    update: Update, std: float, rng: np.random.Generator, *, scale: float = 1.0
) -> Update:
    """``scale * update`` plus N(0, std^2) on every coordinate (in float64, drawn in a
    fixed order of the arrays whatever the dict's order, cast back to each dtype)."""
    out: Update = {}
    for k in sorted(update):
        a = update[k]
        x = a.astype(np.float64) * scale
        if std > 0:
            x += rng.normal(0.0, std, size=a.shape)
        out[k] = x.astype(a.dtype)
    return {k: out[k] for k in update}


def local_dp(
    w: Update, w_t: Update, *, clip_norm: float, noise_multiplier: float, rng: np.random.Generator
) -> tuple[Update, bool]:
    """Local DP on a client: its weights ``w`` after training, with the update
    ``w - w_t`` clipped to ``clip_norm`` and N(0, (z C)^2) added; whether it was
    clipped. Integer buffers are left as trained (they are no part of the update)."""
    floats = [k for k, a in w.items() if np.issubdtype(a.dtype, np.floating)]
    update = {k: (w[k] - w_t[k]).astype(w[k].dtype) for k in floats}
    clipped = clip(update, clip_norm)
    update = add_gaussian(update, noise_multiplier * clip_norm, rng)
    out = dict(w)
    for k in floats:
        out[k] = (w_t[k] + update[k]).astype(w[k].dtype)
    return out, clipped


class GaussianSum(AggregateTransform):
    """The equal-weight mean of n clipped updates -> their sum over the expected cohort
    m, plus Gaussian noise of std ``noise_multiplier * clip_norm / m``."""

    kind: Literal["dp_gaussian_sum"] = "dp_gaussian_sum"
    clip_norm: float = Field(gt=0)
    noise_multiplier: float = Field(ge=0)
    expected_cohort: float = Field(gt=0)

    def std(self, clip_norm: float | None = None) -> float:
        c = self.clip_norm if clip_norm is None else clip_norm
        return self.noise_multiplier * c / self.expected_cohort

    def apply(self, mean: Update, ctx: UpdateContext) -> Update:
        scale = ctx.weight / self.expected_cohort  # ctx.weight: n, the clients folded
        std = self.std(_clip_norm(ctx, self.clip_norm))
        return add_gaussian(mean, std, ctx.rng, scale=scale)


@dataclass
class AdaptiveClip:
    """The clip norm of adaptive clipping, as it moves from round to round."""

    clip_norm: float  # C_t: the norm the next round clips to
    target_quantile: float  # gamma
    learning_rate: float  # eta_C
    count_stddev: float  # sigma_b (0: the count is exact, without privacy)
    expected_cohort: float  # m
    seed: int

    def config(self) -> dict[str, Any]:
        """What the round's instructions carry."""
        return {CLIP_KEY: self.clip_norm}

    def unclipped_fraction(self, server_round: int, clipped: int, n: int) -> float:
        """The noised estimate of the fraction of updates within C_t, over m."""
        centred = (n - clipped) - n / 2  # sum of (b_i - 1/2)
        if self.count_stddev > 0:
            rng = np_rng(self.seed, "dp-clip-count", server_round)
            centred += float(rng.normal(0.0, self.count_stddev))
        return centred / self.expected_cohort + 0.5

    def step(self, server_round: int, clipped: int, n: int) -> None:
        """C_{t+1} from round ``server_round``'s count: ``clipped`` of ``n`` updates."""
        b = self.unclipped_fraction(server_round, clipped, n)
        self.clip_norm *= math.exp(-self.learning_rate * (b - self.target_quantile))

    def state(self) -> dict[str, float]:
        return {"clip_norm": self.clip_norm}

    def restore(self, state: dict[str, Any]) -> None:
        self.clip_norm = float(state["clip_norm"])


def _noise_multipliers(dp: Any, z: float, m: float) -> tuple[float, float]:
    """(the update noise's multiplier, sigma_b): z and 0 for fixed clipping; z_delta and
    sigma_b for adaptive clipping (sigma_b 0 too when z is 0: no privacy asked)."""
    from fedsim.privacy.accounting import adaptive_noise  # (dp-accounting: coordinator only)

    if not dp.adaptive or z == 0:
        return z, 0.0
    sigma_b = dp.count_stddev(m)
    return adaptive_noise(z, sigma_b), sigma_b


def adaptive_clip(scn: Any, noise_multiplier: float | None = None) -> AdaptiveClip | None:
    """The scenario's adaptive clip state at C_0 (None unless clipping is adaptive)."""
    dp = scn.privacy.dp
    if dp.mode != "central" or not dp.adaptive:
        return None
    z = _noise(dp, noise_multiplier)
    m = scn.expected_cohort
    return AdaptiveClip(
        clip_norm=dp.clip_norm,
        target_quantile=0.5 if dp.target_quantile is None else dp.target_quantile,
        learning_rate=0.2 if dp.clip_learning_rate is None else dp.clip_learning_rate,
        count_stddev=_noise_multipliers(dp, z, m)[1],
        expected_cohort=m,
        seed=scn.run.seed,
    )


def _noise(dp: Any, noise_multiplier: float | None) -> float:
    z = dp.noise_multiplier if noise_multiplier is None else noise_multiplier
    if z is None:
        raise ValueError("privacy.dp.noise_multiplier is not set and was not calibrated")
    return z


def mechanism_transforms(scn, noise_multiplier: float | None = None) -> list:
    """The transforms of the scenario's DP mechanism (none without DP): clipping, and
    the noise with the expected cohort m = K (q N under Poisson sampling is K too)."""
    dp = scn.privacy.dp
    if dp.mode != "central":
        return []
    m = scn.expected_cohort
    z_update, _ = _noise_multipliers(dp, _noise(dp, noise_multiplier), m)
    return [
        DpClip(clip_norm=dp.clip_norm),
        GaussianSum(clip_norm=dp.clip_norm, noise_multiplier=z_update, expected_cohort=m),
    ]
