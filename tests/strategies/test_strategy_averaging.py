"""Hand-computed aggregation cases for fedavg, fedprox, fedavgm and qfedavg."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import STRATEGIES

# Two clients used throughout: client 1 has w = [1, 3] from 1 example (loss 0.4),
# client 2 has w = [3, 7] from 3 examples (loss 0.8).
TWO_CLIENTS = [([1.0, 3.0], 1, 0.4), ([3.0, 7.0], 3, 0.8)]
# Weighted mean: ([1, 3] * 1 + [3, 7] * 3) / 4 = [10, 24] / 4 = [2.5, 6.0]
TWO_CLIENTS_MEAN = [2.5, 6.0]
# Weighted train loss: (0.4 * 1 + 0.8 * 3) / 4 = 2.8 / 4 = 0.7
TWO_CLIENTS_LOSS = 0.7


def build(name: str, **params: object):
    return STRATEGIES.get(name)(name=name, **params).build(client_lr=0.1)


@pytest.mark.parametrize(("name", "params"), [("fedavg", {}), ("fedprox", {"proximal_mu": 0.5})])
def test_fedavg_and_fedprox_weighted_mean(name, params, one_round) -> None:
    w, metrics = one_round(build(name, **params), current=[0.0, 0.0], replies=TWO_CLIENTS)
    np.testing.assert_allclose(w, TWO_CLIENTS_MEAN)
    assert metrics["train_loss"] == pytest.approx(TWO_CLIENTS_LOSS)
    assert "num-examples" not in metrics  # Flower drops the weighting key


def test_fedprox_sends_proximal_mu(fake_grid) -> None:
    strategy = build("fedprox", proximal_mu=0.25)
    arrays = ArrayRecord({})
    messages = list(strategy.configure_train(3, arrays, ConfigRecord(), fake_grid([4, 9])))
    assert len(messages) == 2
    for message in messages:
        assert message.content["config"]["proximal-mu"] == 0.25
        assert message.content["config"]["server-round"] == 3


def test_fedavgm_two_rounds_with_momentum(one_round) -> None:
    strategy = build("fedavgm", server_learning_rate=0.5, server_momentum=0.9)
    # Round 1 from w0 = [0, 0]: FedAvg mean is [2.5, 6.0];
    # pseudo-gradient g1 = w0 - mean = [-2.5, -6.0]; v1 = g1;
    # w1 = w0 - 0.5 * v1 = [1.25, 3.0]
    w1, metrics = one_round(strategy, current=[0.0, 0.0], replies=TWO_CLIENTS)
    np.testing.assert_allclose(w1, [1.25, 3.0])
    assert metrics["train_loss"] == pytest.approx(TWO_CLIENTS_LOSS)
    # Round 2 from w1: both clients send [2, 4] -> mean [2, 4];
    # g2 = w1 - mean = [-0.75, -1.0]; v2 = 0.9 * v1 + g2 = [-2.25 - 0.75, -5.4 - 1.0]
    #    = [-3.0, -6.4]; w2 = w1 - 0.5 * v2 = [1.25 + 1.5, 3.0 + 3.2] = [2.75, 6.2]
    w2, _ = one_round(
        strategy,
        current=w1,
        replies=[([2.0, 4.0], 1, 0.1), ([2.0, 4.0], 1, 0.1)],
        server_round=2,
    )
    np.testing.assert_allclose(w2, [2.75, 6.2])


def test_fedavgm_defaults_are_plain_fedavg(one_round) -> None:
    w, _ = one_round(build("fedavgm"), current=[0.0, 0.0], replies=TWO_CLIENTS)
    np.testing.assert_allclose(w, TWO_CLIENTS_MEAN)


# q-FedAvg, q = 1, from w = [1, 1]. Client A: w_A = [0, 1], F_A = 1, n = 1.
# Client B: w_B = [1, 3], F_B = 4, n = 5 (num-examples plays no part in q-FedAvg).
QFEDAVG_REPLIES = [([0.0, 1.0], 1, 1.0), ([1.0, 3.0], 5, 4.0)]


def test_qfedavg_uses_client_lr_for_lipschitz(one_round) -> None:
    # build(client_lr=0.1) -> L = 1 / 0.1 = 10.
    # A: dw = L (w - w_A) = [10, 0], ||dw||^2 = 100, delta = F^q dw = [10, 0],
    #    h = q F^(q-1) ||dw||^2 + L F^q = 100 + 10 = 110
    # B: dw = 10 [0, -2] = [0, -20], ||dw||^2 = 400, delta = 4 [0, -20] = [0, -80],
    #    h = 1 * 4^0 * 400 + 10 * 4 = 440
    # w' = w - sum(delta) / sum(h) = [1 - 10 / 550, 1 + 80 / 550]
    w, metrics = one_round(build("qfedavg", q=1.0), current=[1.0, 1.0], replies=QFEDAVG_REPLIES)
    np.testing.assert_allclose(w, [1 - 10 / 550, 1 + 80 / 550], rtol=1e-8)
    # Train metrics stay num-examples weighted: (1 * 1 + 4 * 5) / 6 = 3.5
    assert metrics["train_loss"] == pytest.approx(3.5)


def test_qfedavg_explicit_client_learning_rate_wins(one_round) -> None:
    # client_learning_rate = 0.5 -> L = 2 (build's client_lr = 0.1 is ignored).
    # A: dw = [2, 0], ||dw||^2 = 4, delta = [2, 0], h = 4 + 2 * 1 = 6
    # B: dw = [0, -4], ||dw||^2 = 16, delta = 4 [0, -4] = [0, -16], h = 16 + 2 * 4 = 24
    # w' = [1 - 2 / 30, 1 + 16 / 30]
    strategy = build("qfedavg", q=1.0, client_learning_rate=0.5)
    w, _ = one_round(strategy, current=[1.0, 1.0], replies=QFEDAVG_REPLIES)
    np.testing.assert_allclose(w, [1 - 2 / 30, 1 + 16 / 30], rtol=1e-8)


def test_qfedavg_needs_a_positive_learning_rate() -> None:
    params = STRATEGIES.get("qfedavg")(name="qfedavg")
    with pytest.raises(ValueError, match="learning rate"):
        params.build(client_lr=0.0)


identical_updates = st.tuples(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False), min_size=1, max_size=5),
    st.lists(st.integers(1, 1000), min_size=1, max_size=6),
)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("fedavg", {}),
        ("fedprox", {"proximal_mu": 0.1}),
        ("fedmedian", {}),
        ("fedtrimmedavg", {"beta": 0.2}),
    ],
)
@settings(max_examples=40, deadline=None)
@given(case=identical_updates)
def test_aggregate_of_identical_updates_is_that_update(name, params, case, one_round) -> None:
    w, num_examples = case
    replies = [(w, n, 0.5) for n in num_examples]
    aggregated, metrics = one_round(build(name, **params), current=[0.0] * len(w), replies=replies)
    np.testing.assert_allclose(aggregated, w, rtol=1e-12, atol=0.0)
    assert metrics["train_loss"] == pytest.approx(0.5)
