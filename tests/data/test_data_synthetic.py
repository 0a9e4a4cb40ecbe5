"""FedProx Synthetic(alpha, beta): statistics of the generator and the loaded federation."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data import SyntheticData
from fedsim.data.synthetic import draw_synthetic_params, generate_synthetic, sample_user


def test_samples_per_user_follow_lognormal_4_2_plus_50() -> None:
    p = draw_synthetic_params(
        alpha=1.0, beta=1.0, num_users=2000, iid=False, rng=np.random.default_rng(0)
    )
    n = p.samples_per_user
    assert n.dtype == np.int64 and n.min() >= 50
    # int(lognormal(4, 2)) + 50 has median floor(e^4) + 50 = 104
    assert 95 <= np.median(n) <= 115
    # P(lognormal(4, 2) < e^6) = Phi(1) = 0.841
    assert abs(np.mean(n - 50 < np.exp(6)) - 0.841) < 0.03


@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 1.5), (1.0, 0.0), (0.0, 1.0)])
def test_prior_stds_match_alpha_beta(alpha: float, beta: float) -> None:
    p = draw_synthetic_params(
        alpha=alpha, beta=beta, num_users=2000, iid=False, rng=np.random.default_rng(1)
    )
    assert p.u.std() == pytest.approx(alpha, rel=0.1, abs=1e-12)
    assert p.B.std() == pytest.approx(beta, rel=0.1, abs=1e-12)
    # v_k ~ N(B_k, 1) per feature; W_k, b_k ~ N(u_k, 1)
    assert (p.v - p.B[:, None]).std() == pytest.approx(1.0, rel=0.05)
    assert np.abs(p.v.mean(axis=1) - p.B).max() < 5 / np.sqrt(60)
    assert (p.W - p.u[:, None, None]).std() == pytest.approx(1.0, rel=0.05)
    assert np.abs(p.W.mean(axis=(1, 2)) - p.u).max() < 5 / np.sqrt(600)
    assert (p.b - p.u[:, None]).std() == pytest.approx(1.0, rel=0.05)
    assert p.W.shape == (2000, 60, 10) and p.b.shape == (2000, 10) and p.v.shape == (2000, 60)


def test_feature_covariance_is_diag_j_pow_minus_1_2() -> None:
    p = draw_synthetic_params(
        alpha=1.0, beta=1.0, num_users=3, iid=False, rng=np.random.default_rng(2)
    )
    x, _ = sample_user(p, 1, rng=np.random.default_rng(3), num_samples=40_000)
    expected = np.arange(1, 61, dtype=float) ** -1.2
    cov = np.cov(x, rowvar=False)
    np.testing.assert_allclose(np.diag(cov), expected, rtol=0.05)
    off = cov - np.diag(np.diag(cov))
    assert np.abs(off).max() < 0.02
    np.testing.assert_allclose(x.mean(axis=0), p.v[1], atol=0.02)


def test_labels_are_argmax_of_local_model() -> None:
    xs, ys, p = generate_synthetic(
        alpha=1.0, beta=1.0, num_users=5, iid=False, rng=np.random.default_rng(4)
    )
    assert len(xs) == len(ys) == 5
    for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
        assert x.shape == (p.samples_per_user[k], 60)
        assert y.dtype == np.int64
        np.testing.assert_array_equal(y, np.argmax(x @ p.W[k] + p.b[k], axis=1))
    assert set(np.concatenate(ys)) <= set(range(10))


def test_iid_variant_shares_model_and_zero_means() -> None:
    xs, ys, p = generate_synthetic(
        alpha=1.0, beta=1.0, num_users=4, iid=True, rng=np.random.default_rng(5)
    )
    for k in range(1, 4):
        np.testing.assert_array_equal(p.W[k], p.W[0])
        np.testing.assert_array_equal(p.b[k], p.b[0])
    assert not np.any(p.v) and not np.any(p.u) and not np.any(p.B)
    assert p.W[0].std() == pytest.approx(1.0, rel=0.2)
    for x, y in zip(xs, ys, strict=True):
        np.testing.assert_array_equal(y, np.argmax(x @ p.W[0] + p.b[0], axis=1))


def test_loaded_federation_split_90_10() -> None:
    spec = SyntheticData(num_clients=12, alpha=0.5, beta=0.5)
    fed = spec.load(seed=11)
    assert fed.num_clients == 12 and fed.num_classes == 10 and fed.input_shape == (60,)
    assert fed.x.dtype == np.float32 and fed.x.shape[1:] == (60,)
    sizes = [tr.size + te.size for tr, te in zip(fed.train_idx, fed.test_idx, strict=True)]
    assert sum(sizes) == fed.x.shape[0] and min(sizes) >= 50
    for tr, te in zip(fed.train_idx, fed.test_idx, strict=True):
        n = tr.size + te.size
        assert tr.size == int(0.9 * n)
        assert np.intersect1d(tr, te).size == 0
    held = np.concatenate(fed.test_idx)
    np.testing.assert_array_equal(fed.x_test, fed.x[held])
    np.testing.assert_array_equal(fed.y_test, fed.y[held])


def test_seed_determines_the_data() -> None:
    spec = SyntheticData(num_clients=4)
    a, b, c = spec.load(seed=1), spec.load(seed=1), spec.load(seed=2)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.x.shape != c.x.shape or not np.array_equal(a.x, c.x)
