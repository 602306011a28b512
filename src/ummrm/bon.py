"""Best-of-N sampling against a proxy reward model, measured by a gold reward model.

For a pool of n samples of one prompt, best-of-N draws N of them without replacement and keeps the
one the proxy scores highest. Its expected gold score has an unbiased estimator that uses the whole
pool. Sort the pool by proxy score ascending. The sample at rank i (1-based) is the best of a random
N-subset with probability C(i-1, N-1) / C(n, N), the share of N-subsets whose highest rank is i.

Ties in the proxy score are broken uniformly at random among the tied maxima, so tied samples share
their winning probability equally. The KL divergence of best-of-N from the policy is taken as
log N - (N - 1) / N, the standard analytic value for best-of-N sampling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ummrm.errors import UmmrmError


def bon_kl(n: int) -> float:
    """Return the KL divergence of best-of-n sampling from the policy, in nats."""
    if n < 1:
        raise UmmrmError(f"N={n} is invalid: best-of-N needs N of at least 1.")
    return math.log(n) - (n - 1) / n


def win_probabilities(proxy_scores: Sequence[float], n: int) -> np.ndarray:
    """Return, for each sample of a pool, the probability that best-of-``n`` by proxy score selects it.

    Samples with equal proxy scores share their combined probability equally.
    """
    scores = np.asarray(proxy_scores, dtype=np.float64)
    size = len(scores)
    if not 1 <= n <= size:
        raise UmmrmError(f"N={n} is invalid for a pool of {size} samples: use 1 <= N <= {size}.")
    if not np.all(np.isfinite(scores)):
        raise UmmrmError("proxy scores contain NaN or infinity; check the reward model's outputs.")
    order = np.argsort(scores, kind="stable")
    total = math.comb(size, n)
    # exact integers: Python's int division rounds correctly even when the binomials exceed float range
    by_rank = np.array([math.comb(rank - 1, n - 1) / total for rank in range(1, size + 1)])
    probabilities = np.empty(size)
    probabilities[order] = by_rank
    # spread the probability of each block of tied scores equally over its members
    sorted_scores = scores[order]
    start = 0
    while start < size:
        end = start
        while end + 1 < size and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        if end > start:
            members = order[start : end + 1]
            probabilities[members] = probabilities[members].sum() / len(members)
        start = end + 1
    return probabilities


def expected_best_of_n(proxy_scores: Sequence[float], values: Sequence[float], n: int) -> float:
    """Return the expected ``values`` (gold or proxy scores) of the sample best-of-``n`` by proxy selects."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) != len(proxy_scores):
        raise UmmrmError(f"the pool has {len(proxy_scores)} proxy scores and {len(values)} values; they must match.")
    return float(np.dot(win_probabilities(proxy_scores, n), values))


def n_values(pool_size: int) -> list[int]:
    """Return 1, 2, 4, ... up to the pool size, plus the pool size itself when it is not a power of 2."""
    values, n = [], 1
    while n <= pool_size:
        values.append(n)
        n *= 2
    if values[-1] != pool_size:
        values.append(pool_size)
    return values


def bootstrap_interval(values: Sequence[float], samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Return the 95% percentile bootstrap interval of the mean over prompts."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float(values.mean())
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def best_of_n_curve(proxy: np.ndarray, gold: np.ndarray, bootstrap_samples: int = 1000, seed: int = 0) -> list[dict]:
    """Return one row per N with KL, the mean gold and proxy scores of best-of-N and the gold interval.

    ``proxy`` and ``gold`` have shape (prompts, pool size). Means are over prompts, and the interval is
    a bootstrap over prompts.
    """
    proxy = np.asarray(proxy, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    if proxy.shape != gold.shape or proxy.ndim != 2:
        raise UmmrmError(f"proxy and gold scores must both have shape (prompts, pool size); got {proxy.shape} and {gold.shape}.")
    rows = []
    for n in n_values(proxy.shape[1]):
        weights = np.stack([win_probabilities(scores, n) for scores in proxy])
        gold_per_prompt = (weights * gold).sum(axis=1)
        proxy_per_prompt = (weights * proxy).sum(axis=1)
        low, high = bootstrap_interval(gold_per_prompt, bootstrap_samples, seed)
        rows.append({
            "n": n,
            "kl": bon_kl(n),
            "gold_mean": float(gold_per_prompt.mean()),
            "gold_low": low,
            "gold_high": high,
            "proxy_mean": float(proxy_per_prompt.mean()),
        })
    return rows
