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

Why equal weights: with num-examples weights, one client's share of the mean is
n_i / sum_j n_j, which a client with many examples (or a lying one) drives towards 1:
no bound on one client's influence short of bounding n_i, so the sensitivity C/m fails.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from fedsim.transforms import AggregateTransform, Update, UpdateContext, UpdateTransform, l2_norm

CLIPPED = "dp_clipped"  # the note: 1.0 when the update was scaled down, else 0.0


class DpClip(UpdateTransform):
    """Clip a client's update to L2 norm ``clip_norm`` (and note whether it was)."""

    kind: Literal["dp_clip"] = "dp_clip"
    clip_norm: float = Field(gt=0)

    def apply(self, update: Update, ctx: UpdateContext) -> Update:
        norm = l2_norm(update)
        clipped = norm > self.clip_norm
        if clipped:
            for a in update.values():
                a *= a.dtype.type(self.clip_norm / norm)
        ctx.notes[CLIPPED] = float(clipped)
        return update


class GaussianSum(AggregateTransform):
    """The equal-weight mean of n clipped updates -> their sum over the expected cohort
    m, plus Gaussian noise of std ``noise_multiplier * clip_norm / m``."""

    kind: Literal["dp_gaussian_sum"] = "dp_gaussian_sum"
    clip_norm: float = Field(gt=0)
    noise_multiplier: float = Field(ge=0)
    expected_cohort: float = Field(gt=0)

    @property
    def std(self) -> float:
        return self.noise_multiplier * self.clip_norm / self.expected_cohort

    def apply(self, mean: Update, ctx: UpdateContext) -> Update:
        scale = ctx.weight / self.expected_cohort  # ctx.weight: n, the clients folded
        std = self.std
        rng = ctx.rng
        out: Update = {}
        for k in sorted(mean):  # a fixed order of draws, whatever the dict's order
            a = mean[k]
            x = a.astype(np.float64) * scale
            if std > 0:
                x += rng.normal(0.0, std, size=a.shape)
            out[k] = x.astype(a.dtype)
        return {k: out[k] for k in mean}


def mechanism_transforms(scn, noise_multiplier: float | None = None) -> list:
    """The transforms of the scenario's DP mechanism (none without DP): clipping, and
    the noise with the expected cohort m = K (q N under Poisson sampling is K too)."""
    dp = scn.privacy.dp
    if dp.mode != "central":
        return []
    z = dp.noise_multiplier if noise_multiplier is None else noise_multiplier
    if z is None:
        raise ValueError("privacy.dp.noise_multiplier is not set and was not calibrated")
    m = min(scn.train_cohort, scn.num_clients)
    return [
        DpClip(clip_norm=dp.clip_norm),
        GaussianSum(clip_norm=dp.clip_norm, noise_multiplier=z, expected_cohort=m),
    ]
