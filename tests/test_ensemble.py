"""Ensemble objectives and WARM's weight average, worked by hand."""

from __future__ import annotations

import pytest
import torch

from conftest import save_tiny_base_model
from ummrm.ensemble import average_state_dicts, combine_rewards, weight_average
from ummrm.errors import UmmrmError

# 3 members x 2 items
REWARDS = [[1.0, -2.0], [3.0, 0.0], [2.0, 5.0]]


def test_mean_objective():
    assert combine_rewards(REWARDS, "mean").tolist() == pytest.approx([2.0, 1.0])


def test_worst_objective():
    assert combine_rewards(REWARDS, "worst").tolist() == pytest.approx([1.0, -2.0])


def test_uncertainty_objective_uses_population_variance():
    # item 0: mean 2, population variance ((1-2)^2 + (3-2)^2 + 0) / 3 = 2/3
    # item 1: mean 1, population variance (9 + 1 + 16) / 3 = 26/3
    expected = [2.0 - 0.5 * 2 / 3, 1.0 - 0.5 * 26 / 3]
    assert combine_rewards(REWARDS, "uncertainty", 0.5).tolist() == pytest.approx(expected)
    assert combine_rewards(REWARDS, "uncertainty", 0.0).tolist() == pytest.approx([2.0, 1.0])


def test_bad_objective_rejected():
    with pytest.raises(UmmrmError, match="median"):
        combine_rewards(REWARDS, "median")
    with pytest.raises(UmmrmError, match="uncertainty_weight=-1"):
        combine_rewards(REWARDS, "uncertainty", -1)


def test_average_state_dicts_by_hand():
    first = {"w": torch.tensor([1.0, 2.0]), "step": torch.tensor(3)}
    second = {"w": torch.tensor([3.0, 6.0]), "step": torch.tensor(3)}
    averaged = average_state_dicts([first, second])
    assert averaged["w"].tolist() == [2.0, 4.0]
    assert averaged["step"].item() == 3


def test_average_rejects_other_shapes():
    with pytest.raises(UmmrmError, match="different shapes"):
        average_state_dicts([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}])


def test_weight_average_of_reward_models(tmp_path):
    from ummrm.models import create_reward_model, load_reward_model, save_reward_model

    base = save_tiny_base_model(tmp_path / "base")
    folders = []
    for seed in (1, 2):
        model, tokenizer = create_reward_model(str(base), seed=seed)
        save_reward_model(model, tokenizer, tmp_path / f"member-{seed}")
        folders.append(str(tmp_path / f"member-{seed}"))
    weight_average(folders, tmp_path / "warm")
    warm, _ = load_reward_model(str(tmp_path / "warm"))
    first, _ = load_reward_model(folders[0])
    second, _ = load_reward_model(folders[1])
    # the heads differ by seed, so the average is a new head; every tensor is the mean of the two
    assert not torch.equal(first.score.weight, second.score.weight)
    expected = (first.score.weight + second.score.weight) / 2
    assert torch.allclose(warm.score.weight, expected, atol=1e-7)
    assert torch.equal(warm.get_input_embeddings().weight, first.get_input_embeddings().weight)
