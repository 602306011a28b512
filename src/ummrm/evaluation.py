"""Pairwise accuracy of a reward model on held-out preference pairs."""

from __future__ import annotations

import numpy as np
from torch import nn

from ummrm.errors import UmmrmError
from ummrm.rewards import EncodedPair, score_sequences


def pairwise_accuracy(chosen_rewards, rejected_rewards, bootstrap_samples: int = 1000, seed: int = 0) -> dict:
    """Return accuracy (ties excluded), its 95% bootstrap interval over pairs, and the mean margin.

    A pair is a tie when both rewards are exactly equal; ties count neither as right nor wrong.
    """
    chosen = np.asarray(chosen_rewards, dtype=np.float64)
    rejected = np.asarray(rejected_rewards, dtype=np.float64)
    if chosen.shape != rejected.shape or chosen.ndim != 1:
        raise UmmrmError(f"chosen and rejected rewards must be two lists of the same length, got {chosen.shape} and {rejected.shape}.")
    margins = chosen - rejected
    decided = margins != 0
    correct = (margins[decided] > 0).astype(np.float64)
    result = {
        "pairs": int(len(margins)),
        "ties": int((~decided).sum()),
        "accuracy": float(correct.mean()) if len(correct) else float("nan"),
        "ci_low": float("nan"),
        "ci_high": float("nan"),
        "mean_margin": float(margins.mean()) if len(margins) else float("nan"),
        "mean_chosen": float(chosen.mean()) if len(chosen) else float("nan"),
        "mean_rejected": float(rejected.mean()) if len(rejected) else float("nan"),
    }
    if len(correct) and bootstrap_samples > 0:
        generator = np.random.default_rng(seed)
        resamples = generator.integers(0, len(correct), size=(bootstrap_samples, len(correct)))
        accuracies = correct[resamples].mean(axis=1)
        result["ci_low"], result["ci_high"] = (float(value) for value in np.percentile(accuracies, [2.5, 97.5]))
    return result


def evaluate_reward_model(
    model: nn.Module,
    pairs: list[EncodedPair],
    pad_token_id: int,
    batch_size: int = 16,
    bootstrap_samples: int = 1000,
    seed: int = 0,
) -> dict:
    """Score chosen and rejected responses of every pair and return ``pairwise_accuracy``'s summary."""
    if not pairs:
        raise UmmrmError("no evaluation pairs; check the data source and eval_fraction.")
    sequences = [pair.chosen_ids for pair in pairs] + [pair.rejected_ids for pair in pairs]
    rewards = score_sequences(model, sequences, pad_token_id, batch_size)
    return pairwise_accuracy(rewards[: len(pairs)], rewards[len(pairs) :], bootstrap_samples, seed)
