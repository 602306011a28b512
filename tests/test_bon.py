"""Best-of-N: the unbiased estimator against brute-force enumeration, and the KL formula."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ummrm.bon import best_of_n_curve, bon_kl, expected_best_of_n, n_values, win_probabilities
from ummrm.errors import UmmrmError


def brute_force(proxy, gold, n):
    """Mean gold of best-of-n over every n-subset, ties among the maxima broken uniformly."""
    totals = []
    for subset in itertools.combinations(range(len(proxy)), n):
        best = max(proxy[i] for i in subset)
        winners = [i for i in subset if proxy[i] == best]
        totals.append(sum(gold[i] for i in winners) / len(winners))
    return sum(totals) / len(totals)


POOLS = [
    ([0.3, -1.2, 2.5, 0.0, 1.1, 0.7], [1.0, 0.2, -0.5, 0.4, 2.0, 0.1]),
    # ties in the proxy score, including a tie at the maximum
    ([1.0, 1.0, 0.5, 2.0, 2.0, 0.5, -1.0], [0.0, 3.0, 1.0, -2.0, 4.0, 0.5, 1.5]),
    # every score equal: best-of-N is then a uniform sample
    ([0.7, 0.7, 0.7, 0.7], [1.0, 2.0, 3.0, 6.0]),
]


@pytest.mark.parametrize("proxy,gold", POOLS)
def test_estimator_matches_enumeration(proxy, gold):
    for n in range(1, len(proxy) + 1):
        assert expected_best_of_n(proxy, gold, n) == pytest.approx(brute_force(proxy, gold, n), abs=1e-12)


def test_random_pools_match_enumeration():
    rng = np.random.default_rng(0)
    for _ in range(20):
        size = int(rng.integers(2, 9))
        # integer proxy scores make ties frequent
        proxy = rng.integers(0, 4, size).astype(float).tolist()
        gold = rng.normal(size=size).tolist()
        n = int(rng.integers(1, size + 1))
        assert expected_best_of_n(proxy, gold, n) == pytest.approx(brute_force(proxy, gold, n), abs=1e-12)


def test_win_probabilities_sum_to_one():
    probabilities = win_probabilities([3.0, 1.0, 2.0, 2.0, 5.0], 3)
    assert probabilities.sum() == pytest.approx(1.0)
    # N = 1 is a uniform sample; N = pool size always takes the proxy's maximum
    assert win_probabilities([3.0, 1.0, 2.0], 1).tolist() == pytest.approx([1 / 3] * 3)
    assert win_probabilities([3.0, 1.0, 2.0], 3).tolist() == [1.0, 0.0, 0.0]


def test_large_pool_keeps_precision():
    # C(600, 300) is far beyond float range; the exact integer division must still give probabilities
    probabilities = win_probabilities(list(range(600)), 300)
    assert probabilities.sum() == pytest.approx(1.0)
    assert np.all(np.isfinite(probabilities))


def test_kl_formula():
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert bon_kl(32) == pytest.approx(math.log(32) - 31 / 32)


def test_invalid_n_rejected():
    with pytest.raises(UmmrmError, match="N=5"):
        win_probabilities([1.0, 2.0], 5)
    with pytest.raises(UmmrmError, match="N=0"):
        bon_kl(0)
    with pytest.raises(UmmrmError, match="NaN"):
        win_probabilities([1.0, float("nan")], 1)


def test_n_values_powers_of_two():
    assert n_values(32) == [1, 2, 4, 8, 16, 32]
    assert n_values(12) == [1, 2, 4, 8, 12]


def test_curve_means_over_prompts():
    proxy = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    gold = np.array([[1.0, 2.0, 3.0], [0.0, 5.0, 1.0]])
    curve = best_of_n_curve(proxy, gold, bootstrap_samples=200, seed=0)
    assert [row["n"] for row in curve] == [1, 2, 3]
    # N = 3 picks the proxy's maximum in each prompt: gold 3.0 and 0.0
    assert curve[-1]["gold_mean"] == pytest.approx(1.5)
    assert curve[0]["gold_mean"] == pytest.approx((2.0 + 2.0) / 2)
    assert curve[-1]["proxy_mean"] == pytest.approx(2.0)
    assert curve[-1]["gold_low"] <= curve[-1]["gold_mean"] <= curve[-1]["gold_high"]
