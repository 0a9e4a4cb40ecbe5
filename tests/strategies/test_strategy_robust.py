"""Hand-computed cases for fedmedian, fedtrimmedavg, krum, multikrum and bulyan."""

from __future__ import annotations

import numpy as np
import pytest

from strategies import STRATEGIES

TWO_CLIENTS = [([1.0, 3.0], 1, 0.4), ([3.0, 7.0], 3, 0.8)]


def build(name: str, **params: object):
    return STRATEGIES.get(name)(name=name, **params).build(client_lr=0.1)


def test_fedmedian_two_clients_is_unweighted_midpoint(one_round) -> None:
    # Median of two values is their plain mean; num-examples (1 vs 3) is ignored:
    # [(1 + 3) / 2, (3 + 7) / 2] = [2, 5]
    w, metrics = one_round(build("fedmedian"), current=[0.0, 0.0], replies=TWO_CLIENTS)
    np.testing.assert_allclose(w, [2.0, 5.0])
    # Metrics are still weighted: (0.4 * 1 + 0.8 * 3) / 4 = 0.7
    assert metrics["train_loss"] == pytest.approx(0.7)


def test_fedmedian_ignores_an_outlier(one_round) -> None:
    # Coordinate-wise: median(1, 2, 100) = 2; median(-5, 0, 1) = 0
    replies = [([1.0, 0.0], 1, 1.0), ([2.0, -5.0], 1, 1.0), ([100.0, 1.0], 1, 1.0)]
    w, _ = one_round(build("fedmedian"), current=[0.0, 0.0], replies=replies)
    np.testing.assert_allclose(w, [2.0, 0.0])


def test_fedtrimmedavg_two_clients_trims_nothing(one_round) -> None:
    # beta = 0.2, n = 2: floor(0.2 * 2) = 0 cut per tail -> unweighted mean [2, 5]
    w, _ = one_round(build("fedtrimmedavg", beta=0.2), current=[0.0, 0.0], replies=TWO_CLIENTS)
    np.testing.assert_allclose(w, [2.0, 5.0])


def test_fedtrimmedavg_cuts_each_tail(one_round) -> None:
    # beta = 0.2, n = 5: floor(0.2 * 5) = 1 cut per tail.
    # Coordinate 0: values 1, 2, 3, 4, 100 -> mean(2, 3, 4) = 3
    # Coordinate 1: values -50, 0, 10, 20, 30 -> mean(0, 10, 20) = 10
    values = [(1.0, 30.0), (2.0, -50.0), (3.0, 0.0), (4.0, 10.0), (100.0, 20.0)]
    replies = [(list(v), 1, 1.0) for v in values]
    w, _ = one_round(build("fedtrimmedavg", beta=0.2), current=[0.0, 0.0], replies=replies)
    np.testing.assert_allclose(w, [3.0, 10.0])


# Four clients on a line for the Krum family (f = 0, so each update is scored by its
# n - f - 2 = 2 nearest neighbours): A = 0, B = 1, C = 3, D = 10.
# Squared distances: AB = 1, AC = 9, AD = 100, BC = 4, BD = 81, CD = 49.
# Scores: A = 1 + 9 = 10, B = 1 + 4 = 5, C = 4 + 9 = 13, D = 49 + 81 = 130.
KRUM_REPLIES = [([0.0], 1, 0.1), ([1.0], 3, 0.2), ([3.0], 1, 0.3), ([10.0], 1, 0.4)]


def test_krum_selects_the_lowest_score(one_round) -> None:
    w, metrics = one_round(build("krum"), current=[0.0], replies=KRUM_REPLIES)
    np.testing.assert_allclose(w, [1.0])  # B
    assert metrics["train_loss"] == pytest.approx(0.2)  # B's loss alone


def test_krum_smallest_valid_cohort(one_round) -> None:
    # f = 0 needs n > 2f + 2 = 2, so n = 3: A = 0, B = 1, C = 10, one neighbour each.
    # Scores: A = |A-B|^2 = 1, B = 1, C = |C-B|^2 = 81 -> A or B (tie), never C.
    assert STRATEGIES.get("krum")(name="krum").check(cohort_size=3) == []
    replies = [([0.0], 1, 0.1), ([1.0], 1, 0.2), ([10.0], 1, 0.3)]
    w, _ = one_round(build("krum"), current=[0.0], replies=replies)
    assert float(w[0]) in (0.0, 1.0)


def test_multikrum_averages_the_best_m(one_round) -> None:
    # m = 2 lowest scores: B (5) and A (10); weighted by num-examples (3 and 1):
    # (1 * 0 + 3 * 1) / 4 = 0.75; loss (1 * 0.1 + 3 * 0.2) / 4 = 0.175
    strategy = build("multikrum", num_nodes_to_select=2)
    w, metrics = one_round(strategy, current=[0.0], replies=KRUM_REPLIES)
    np.testing.assert_allclose(w, [0.75])
    assert metrics["train_loss"] == pytest.approx(0.175)


def test_bulyan_smallest_valid_cohort_f0(one_round) -> None:
    # f = 0, n = 3 = 4f + 3: theta = n - 2f = 3 models kept, beta = theta - 2f = 3
    # closest to the median averaged -> unweighted mean of all: (0 + 1 + 10) / 3
    replies = [([0.0], 1, 0.1), ([1.0], 5, 0.2), ([10.0], 1, 0.3)]
    w, _ = one_round(build("bulyan"), current=[0.0], replies=replies)
    np.testing.assert_allclose(w, [11.0 / 3.0])


def test_bulyan_f1_seven_clients(one_round) -> None:
    # f = 1, n = 7 = 4f + 3: values 0, 1, 3, 4, 8 and outliers 100, -100.
    # Krum scores (n - f - 2 = 4 nearest, squared distances):
    #   0: 1 + 9 + 16 + 64 = 90       1: 1 + 4 + 9 + 49 = 63
    #   3: 9 + 4 + 1 + 25 = 39        4: 16 + 9 + 1 + 16 = 42
    #   8: 64 + 49 + 25 + 16 = 154    100: 8464 + 9216 + 9409 + 9801 = 36890
    #   -100: 10000 + 10201 + 10609 + 10816 = 41626
    # theta = n - 2f = 5 best: {0, 1, 3, 4, 8}; median = 3;
    # beta = theta - 2f = 3 closest to 3: {3, 4, 1} -> (3 + 4 + 1) / 3 = 8 / 3
    values = [0.0, 100.0, 1.0, 3.0, -100.0, 4.0, 8.0]
    replies = [([v], 1, 1.0) for v in values]
    strategy = build("bulyan", num_malicious_nodes=1)
    w, _ = one_round(strategy, current=[0.0], replies=replies)
    np.testing.assert_allclose(w, [8.0 / 3.0])


def test_bulyan_below_4f_plus_3_is_what_check_reports(one_round) -> None:
    # Flower silently skips aggregation (returns None) when n < 4f + 3; check() is
    # how fedsim reports it before a run starts.
    params = STRATEGIES.get("bulyan")(name="bulyan", num_malicious_nodes=1)
    assert params.check(cohort_size=6) != []
    replies = [([float(v)], 1, 1.0) for v in range(6)]
    w, metrics = one_round(params.build(client_lr=0.1), current=[0.0], replies=replies)
    assert w is None and metrics is None
