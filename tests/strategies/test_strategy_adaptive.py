"""First-round server steps of FedAdam, FedYogi and FedAdagrad, computed by hand.

Reddi et al. 2021 (arXiv:2003.00295), as Flower implements it: m_0 = v_0 = 0,
Delta = weighted mean of client models - current model,
m_1 = beta_1 m_0 + (1 - beta_1) Delta, w_1 = w_0 + eta m_1 / (sqrt(v_1) + tau).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from strategies import STRATEGIES

W0 = [0.0, 1.0]
# Client 1: w = [1, 3] (n = 1); client 2: w = [3, 7] (n = 3)
REPLIES = [([1.0, 3.0], 1, 0.4), ([3.0, 7.0], 3, 0.8)]
# Weighted mean = [2.5, 6.0], so Delta_1 = [2.5, 6.0] - [0, 1] = [2.5, 5.0]
DELTA = [2.5, 5.0]


def build(name: str, **params: object):
    return STRATEGIES.get(name)(name=name, **params).build(client_lr=0.1)


def test_fedadam_first_round(one_round) -> None:
    # Defaults: eta = 0.1, beta_1 = 0.9, beta_2 = 0.99, tau = 1e-3.
    # m_1 = 0.1 * [2.5, 5.0] = [0.25, 0.5]
    # v_1 = 0.01 * [2.5^2, 5^2] = [0.0625, 0.25], sqrt(v_1) = [0.25, 0.5]
    # Flower's bias correction with exponent server_round + 1 = 2:
    # eta_t = 0.1 * sqrt(1 - 0.99^2) / (1 - 0.9^2)
    eta_t = 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    expected = [0.0 + eta_t * 0.25 / (0.25 + 1e-3), 1.0 + eta_t * 0.5 / (0.5 + 1e-3)]
    w, metrics = one_round(build("fedadam"), current=W0, replies=REPLIES)
    np.testing.assert_allclose(w, expected, rtol=1e-10)
    assert metrics["train_loss"] == pytest.approx(0.7)


def test_fedyogi_first_round(one_round) -> None:
    # Defaults: eta = 0.01, beta_1 = 0.9, beta_2 = 0.99, tau = 1e-3.
    # m_1 = [0.25, 0.5]
    # v_1 = v_0 - (1 - beta_2) Delta^2 sign(v_0 - Delta^2) = 0 + 0.01 Delta^2
    #     = [0.0625, 0.25], sqrt(v_1) = [0.25, 0.5]
    expected = [0.0 + 0.01 * 0.25 / (0.25 + 1e-3), 1.0 + 0.01 * 0.5 / (0.5 + 1e-3)]
    w, _ = one_round(build("fedyogi"), current=W0, replies=REPLIES)
    np.testing.assert_allclose(w, expected, rtol=1e-10)


def test_fedadagrad_two_rounds(one_round) -> None:
    strategy = build("fedadagrad")  # eta = 0.1, tau = 1e-3, beta_1 = 0
    # Round 1: m_1 = Delta_1 = [2.5, 5.0], v_1 = Delta_1^2 = [6.25, 25.0]
    # w_1 = w_0 + 0.1 * [2.5, 5.0] / ([2.5, 5.0] + 1e-3)
    w1_expected = [0.0 + 0.1 * 2.5 / 2.501, 1.0 + 0.1 * 5.0 / 5.001]
    w1, _ = one_round(strategy, current=W0, replies=REPLIES)
    np.testing.assert_allclose(w1, w1_expected, rtol=1e-10)
    # Round 2: both clients send w_1 + [1, -2], so Delta_2 = [1, -2];
    # v_2 = v_1 + Delta_2^2 = [7.25, 29.0]; w_2 = w_1 + 0.1 Delta_2 / (sqrt(v_2) + tau)
    client = [w1[0] + 1.0, w1[1] - 2.0]
    w2, _ = one_round(
        strategy, current=w1, replies=[(client, 2, 0.3), (client, 5, 0.3)], server_round=2
    )
    w2_expected = [
        w1[0] + 0.1 * 1.0 / (math.sqrt(7.25) + 1e-3),
        w1[1] + 0.1 * -2.0 / (math.sqrt(29.0) + 1e-3),
    ]
    np.testing.assert_allclose(w2, w2_expected, rtol=1e-10)


def test_fedadam_parameters_reach_the_update(one_round) -> None:
    # beta_1 = 0, beta_2 = 0, eta = 1, tau = 1: m_1 = Delta, v_1 = Delta^2,
    # eta_t = 1 * sqrt(1 - 0) / (1 - 0) = 1, w_1 = w_0 + Delta / (|Delta| + 1)
    strategy = build("fedadam", eta=1.0, beta_1=0.0, beta_2=0.0, tau=1.0)
    w, _ = one_round(strategy, current=W0, replies=REPLIES)
    np.testing.assert_allclose(w, [0.0 + 2.5 / 3.5, 1.0 + 5.0 / 6.0], rtol=1e-10)
