"""Privacy accounting with Google's dp-accounting library (RDP and PLD).

The accountant is told the mechanism as a ``dp_accounting`` event that matches what the
simulation actually did, never a better one:

- **Poisson sampling** (each client joins a round independently with probability q):
  the Poisson-subsampled Gaussian under add/remove-one neighbouring (Abadi et al. 2016,
  arXiv:1607.00133; Mironov et al. 2019, arXiv:1908.10530), with the sum's sensitivity C.
- **Fixed-size sampling** (k of N without replacement): the sampled-without-replacement
  Gaussian under replace-one neighbouring (Wang, Balle, Kasiviswanathan 2019,
  arXiv:1808.00087, Theorem 27), RDP only. Replacing one client's clipped update by
  another moves the sum by up to 2C, so the noise std zC is z/2 sensitivities.
- **No amplification** (churn, or a client that always takes part): the plain Gaussian
  mechanism with sensitivity C, composed once per round in which the client may have
  taken part, under add/remove-one neighbouring. This is what churn leaves: a client
  online in few rounds may be sampled in each of them, so no sampling rate bounds it.

Accountants are rebuilt from the counts (never composed round by round), so an epsilon
is a pure function of (event, count): a resumed run reports the same numbers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import dp_accounting as dpa
import numpy as np
from dp_accounting import pld, rdp

Accountant = Literal["rdp", "pld"]
Sampling = Literal["poisson", "fixed", "none"]

# RDP orders: a dense grid near 1 (small epsilons) up to 512 (large ones), as TF Privacy
# and Opacus use; the bound is the minimum over orders, so more orders only tighten it.
RDP_ORDERS: tuple[float, ...] = (
    tuple(1 + x / 10 for x in range(1, 100)) + tuple(range(11, 64)) + (128, 256, 512)
)
PLD_DISCRETIZATION = 1e-4  # dp-accounting's default value_discretization_interval

# dp-accounting warns (through absl) whenever an RDP order fails to converge and is left
# out of the minimum; the bound stays valid, and bisection hits such orders often.
logging.getLogger("absl").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Mechanism:
    """One application of the (subsampled) Gaussian mechanism, as accounted.

    ``noise_multiplier`` is the noise std over the sensitivity C of the clipped sum
    (z); ``q`` the sampling probability (Poisson), ``k``/``n`` the cohort and the
    population (fixed size)."""

    noise_multiplier: float
    sampling: Sampling
    q: float = 1.0
    k: int = 0
    n: int = 0

    def event(self) -> dpa.DpEvent:
        z = self.noise_multiplier
        if z <= 0:
            return dpa.NonPrivateDpEvent()
        if self.sampling == "poisson":
            return dpa.PoissonSampledDpEvent(self.q, dpa.GaussianDpEvent(z))
        if self.sampling == "fixed":
            # replace-one: std zC on a sum whose sensitivity is 2C
            return dpa.SampledWithoutReplacementDpEvent(self.n, self.k, dpa.GaussianDpEvent(z / 2))
        return dpa.GaussianDpEvent(z)

    @property
    def relation(self) -> dpa.NeighboringRelation:
        if self.sampling == "fixed":
            return dpa.NeighboringRelation.REPLACE_ONE
        return dpa.NeighboringRelation.ADD_OR_REMOVE_ONE


def _accountant(
    kind: Accountant, relation: dpa.NeighboringRelation, orders: Sequence[float] = RDP_ORDERS
) -> dpa.PrivacyAccountant:
    if kind == "rdp":
        return rdp.RdpAccountant(list(orders), neighboring_relation=relation)
    return pld.PLDAccountant(relation, value_discretization_interval=PLD_DISCRETIZATION)


def supports(kind: Accountant, mech: Mechanism) -> bool:
    """Whether the accountant can account this mechanism (PLD has no fixed-size event)."""
    return _accountant(kind, mech.relation).supports(mech.event())


@lru_cache(maxsize=256)
def _rdp_step(mech: Mechanism, orders: tuple[float, ...]) -> np.ndarray:
    """The RDP of one application of ``mech`` at each order (composition multiplies it
    by the count, exactly as ``RdpAccountant.compose(event, count)`` does)."""
    acc = _accountant("rdp", mech.relation, orders)
    acc.compose(mech.event(), 1)
    return np.array(acc._rdp)  # the accountant's composed RDP vector (one step here)


@lru_cache(maxsize=64)
def _pld_step(mech: Mechanism) -> pld.privacy_loss_distribution.PrivacyLossDistribution:
    """The PLD of one application of a Poisson-subsampled Gaussian (built once: ~0.4 s)."""
    return pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=mech.noise_multiplier,
        value_discretization_interval=PLD_DISCRETIZATION,
        sampling_prob=mech.q,
        neighboring_relation=mech.relation,
    )


@lru_cache(maxsize=4096)
def epsilon(
    kind: Accountant,
    mech: Mechanism,
    count: int,
    delta: float,
    orders: tuple[float, ...] = RDP_ORDERS,
) -> float:
    """Epsilon at ``delta`` after ``count`` compositions of ``mech`` (0 for count 0,
    inf without noise); ``orders`` are the RDP orders (RDP only).

    The one-step RDP vector and PLD are cached per mechanism, so the epsilon of each
    round of a run costs a conversion (RDP: well under a millisecond), not a new
    accountant (tens of milliseconds)."""
    if count <= 0:
        return 0.0
    if mech.noise_multiplier <= 0:
        return math.inf
    if kind == "rdp":
        eps, _ = rdp.rdp_privacy_accountant.compute_epsilon(
            orders, count * _rdp_step(mech, orders), delta
        )
        return float(eps)
    if mech.sampling == "poisson":
        return float(_pld_step(mech).self_compose(count).get_epsilon_for_delta(delta))
    acc = _accountant(kind, mech.relation, orders)
    acc.compose(mech.event(), count)
    return float(acc.get_epsilon(delta))


def calibrate(
    kind: Accountant,
    make: Callable[[float], Mechanism],
    count: int,
    delta: float,
    target: float,
    *,
    tol: float = 1e-3,
) -> float:
    """The smallest noise multiplier z (to ``tol`` relative) with
    ``epsilon(make(z), count) <= target``, by bisection (epsilon falls as z rises)."""
    if not target > 0:
        raise ValueError("target epsilon must be positive")
    lo, hi = 0.0, 1.0
    while epsilon(kind, make(hi), count, delta) > target:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 reaches epsilon {target:g}")
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2
        if epsilon(kind, make(mid), count, delta) > target:
            lo = mid
        else:
            hi = mid
    return hi


def adaptive_noise(z: float, sigma_b: float) -> float:
    """The update's noise multiplier when the clipped-count is noised with ``sigma_b``
    (Andrew et al. 2021, arXiv:1905.03871, Theorem 1): the two Gaussian releases together
    cost what one with multiplier z costs, z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)."""
    rest = z**-2 - (2 * sigma_b) ** -2
    if rest <= 0:
        raise ValueError(
            f"count noise sigma_b = {sigma_b:g} is too small for noise_multiplier {z:g}: "
            f"it needs sigma_b > z/2 = {z / 2:g}"
        )
    return rest**-0.5


def steps_per_epoch(n: int, batch_size: int) -> int:
    """DP-SGD steps in one epoch over n examples with Poisson batches of expected size
    B: ceil(n / B), each example in a step with probability 1 / ceil(n / B) (Opacus's
    ``DPDataLoader``); 0 without examples."""
    return math.ceil(n / batch_size) if n > 0 else 0


def epsilons(kind: Accountant, mech: Mechanism, counts: Sequence[int], delta: float) -> list[float]:
    """Epsilon for each count (per-client accounting: a client's own number of
    compositions), computed once per distinct count."""
    return [epsilon(kind, mech, int(c), delta) for c in counts]
