"""Pairwise accuracy of a reward model, worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_reward_model

from ummrm.errors import UmmrmError
from ummrm.evaluation import evaluate_reward_model, pairwise_accuracy
from ummrm.rewards import EncodedPair, score_sequences

TOLERANCE = 1e-12
# margins 1, -1, 0, 3, 0: two ties, and two of the three decided pairs are right
CHOSEN = [2.0, 1.0, 0.5, 3.0, 1.0]
REJECTED = [1.0, 2.0, 0.5, 0.0, 1.0]


def test_pairwise_accuracy_by_hand():
    result = pairwise_accuracy(CHOSEN, REJECTED, bootstrap_samples=200, seed=0)

    assert result["pairs"] == 5
    assert result["ties"] == 2
    assert abs(result["accuracy"] - 2 / 3) < TOLERANCE, f"accuracy {result['accuracy']}, expected 2/3"
    # the mean margin counts ties: (1 - 1 + 0 + 3 + 0) / 5
    assert abs(result["mean_margin"] - 0.6) < TOLERANCE, f"mean margin {result['mean_margin']}, expected 0.6"
    assert abs(result["mean_chosen"] - 1.5) < TOLERANCE, f"mean chosen reward {result['mean_chosen']}, expected 1.5"
    assert abs(result["mean_rejected"] - 0.9) < TOLERANCE, f"mean rejected reward {result['mean_rejected']}, expected 0.9"


def test_interval_contains_accuracy():
    chosen = torch.randn(40, generator=torch.Generator().manual_seed(0)).tolist()
    rejected = torch.randn(40, generator=torch.Generator().manual_seed(1)).tolist()

    result = pairwise_accuracy(chosen, rejected, bootstrap_samples=500, seed=0)

    assert 0.0 <= result["ci_low"] <= result["accuracy"], f"interval [{result['ci_low']}, {result['ci_high']}] vs {result['accuracy']}"
    assert result["accuracy"] <= result["ci_high"] <= 1.0, f"interval [{result['ci_low']}, {result['ci_high']}] vs {result['accuracy']}"
    assert result["ci_low"] < result["ci_high"], "40 pairs of mixed outcomes gave an interval of zero width"


def test_interval_seeded():
    chosen = torch.randn(30, generator=torch.Generator().manual_seed(0)).tolist()
    rejected = torch.randn(30, generator=torch.Generator().manual_seed(1)).tolist()

    first = pairwise_accuracy(chosen, rejected, bootstrap_samples=300, seed=7)
    second = pairwise_accuracy(chosen, rejected, bootstrap_samples=300, seed=7)
    other = pairwise_accuracy(chosen, rejected, bootstrap_samples=300, seed=8)

    assert first == second, f"one seed gave {first} and {second}"
    assert (first["ci_low"], first["ci_high"]) != (other["ci_low"], other["ci_high"]), "seeds 7 and 8 gave the same interval"


def test_all_right_interval_is_one():
    result = pairwise_accuracy([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], bootstrap_samples=50)

    assert result["accuracy"] == 1.0
    assert (result["ci_low"], result["ci_high"]) == (1.0, 1.0)


def test_all_ties_give_nan():
    result = pairwise_accuracy([1.0, 2.0], [1.0, 2.0])

    assert result["ties"] == 2
    assert math.isnan(result["accuracy"]), f"accuracy over zero decided pairs is {result['accuracy']}"
    assert math.isnan(result["ci_low"]), f"interval low end {result['ci_low']} over zero decided pairs"
    assert math.isnan(result["ci_high"]), f"interval high end {result['ci_high']} over zero decided pairs"
    assert result["mean_margin"] == 0.0


def test_no_bootstrap_no_interval():
    result = pairwise_accuracy(CHOSEN, REJECTED, bootstrap_samples=0)

    assert abs(result["accuracy"] - 2 / 3) < TOLERANCE, f"accuracy {result['accuracy']}"
    assert math.isnan(result["ci_low"]), f"interval low end {result['ci_low']} without bootstrap samples"
    assert math.isnan(result["ci_high"]), f"interval high end {result['ci_high']} without bootstrap samples"


@pytest.mark.parametrize(
    ("chosen", "rejected"),
    [([1.0, 2.0], [1.0]), ([[1.0, 2.0]], [[0.0, 1.0]])],
)
def test_pairwise_accuracy_shape_errors(chosen, rejected):
    with pytest.raises(UmmrmError, match=r"chosen and rejected rewards must be two lists of the same length"):
        pairwise_accuracy(chosen, rejected)


def test_evaluate_reward_model_scores_pairs():
    model = tiny_reward_model("llama")
    pairs = [EncodedPair([5, 6, 7], [5, 6, 8, 9], 0), EncodedPair([10, 11], [12], 1), EncodedPair([3], [4, 4], 2)]

    result = evaluate_reward_model(model, pairs, pad_token_id=0, batch_size=2, bootstrap_samples=0)

    chosen = score_sequences(model, [pair.chosen_ids for pair in pairs], 0)
    rejected = score_sequences(model, [pair.rejected_ids for pair in pairs], 0)
    expected = pairwise_accuracy(chosen, rejected, bootstrap_samples=0)
    assert result["pairs"] == 3
    assert result["accuracy"] == expected["accuracy"], f"accuracy {result['accuracy']} != {expected['accuracy']}"
    assert abs(result["mean_margin"] - expected["mean_margin"]) < 1e-6, f"mean margin {result['mean_margin']} != {expected['mean_margin']}"


def test_evaluate_without_pairs_raises():
    with pytest.raises(UmmrmError, match=r"no evaluation pairs"):
        evaluate_reward_model(tiny_reward_model("llama"), [], pad_token_id=0)
