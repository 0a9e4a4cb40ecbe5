"""The accountant against published test vectors, and what it is told."""

from __future__ import annotations

import math

import pytest

from fedsim.privacy.accounting import Mechanism, adaptive_noise, calibrate, epsilon, supports

# The orders of TF Privacy's and Opacus's tests.
ORDERS_A = tuple(
    [1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5] + list(range(5, 64)) + [128, 256, 512]
)
ORDERS_B = tuple([1 + x / 10 for x in range(1, 100)] + list(range(12, 64)))


@pytest.mark.parametrize(
    ("q", "z", "steps", "delta", "orders", "expected"),
    [
        (0.0025, 1.3, 6000, 1e-5, ORDERS_A, 0.7242),
        (0.001, 1.0, 30000, 1e-7, ORDERS_A, 1.4155),
        (0.04, 1.5, 2250, 1e-5, ORDERS_B, 7.329),
    ],
)
def test_poisson_subsampled_gaussian_rdp_vectors(q, z, steps, delta, orders, expected):
    got = epsilon("rdp", Mechanism(z, "poisson", q=q), steps, delta, orders)
    assert got == pytest.approx(expected, rel=1e-3)


def test_pld_is_at_least_as_tight_as_rdp_and_close_to_it():
    m = Mechanism(1.3, "poisson", q=0.0025)
    rdp, pld = epsilon("rdp", m, 6000, 1e-5), epsilon("pld", m, 6000, 1e-5)
    assert pld < rdp and pld > 0.8 * rdp


def test_amplification_is_only_what_the_sampling_gives():
    z, n, k, rounds, delta = 1.0, 1000, 10, 100, 1e-5
    poisson = epsilon("rdp", Mechanism(z, "poisson", q=k / n), rounds, delta)
    fixed = epsilon("rdp", Mechanism(z, "fixed", k=k, n=n), rounds, delta)
    none = epsilon("rdp", Mechanism(z, "none"), rounds, delta)
    # no sampling assumed: the full Gaussian composition, far above either sampled one
    assert poisson < fixed < none
    # without amplification, rounds compose like one Gaussian with z / sqrt(rounds)
    assert none == pytest.approx(
        epsilon("rdp", Mechanism(z / math.sqrt(rounds), "none"), 1, delta), rel=1e-6
    )
    assert not supports("pld", Mechanism(z, "fixed", k=k, n=n))
    assert supports("rdp", Mechanism(z, "fixed", k=k, n=n))


def test_epsilon_grows_with_rounds_falls_with_noise_and_is_infinite_without_noise():
    m = lambda z: Mechanism(z, "poisson", q=0.01)  # noqa: E731
    eps = [epsilon("rdp", m(1.0), r, 1e-5) for r in (0, 1, 10, 100)]
    assert eps[0] == 0 and eps == sorted(eps) and len(set(eps)) == 4
    assert epsilon("rdp", m(2.0), 100, 1e-5) < eps[-1]
    assert epsilon("rdp", m(0.0), 1, 1e-5) == math.inf


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_calibration_spends_the_target_within_one_percent_below(kind):
    make = lambda z: Mechanism(z, "poisson", q=0.02)  # noqa: E731
    z = calibrate(kind, make, 200, 1e-5, 8.0)
    got = epsilon(kind, make(z), 200, 1e-5)
    assert 0.99 * 8.0 <= got <= 8.0


def test_adaptive_clipping_noise_matches_andrew_et_al():
    assert adaptive_noise(3, 5) == pytest.approx(3.1448545, abs=1e-7)
    with pytest.raises(ValueError, match="sigma_b"):
        adaptive_noise(3, 1)
