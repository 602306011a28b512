"""Reward-model ensembles and WARM, the weight average of reward models.

An ensemble scores each response with M reward models and combines the M rewards with an objective:

- ``mean``: the mean of the members' rewards;
- ``worst``: the minimum over members (worst-case optimisation);
- ``uncertainty``: the mean minus ``uncertainty_weight`` times the members' population variance
  (uncertainty-weighted optimisation).

WARM (weight-averaged reward models) averages the members' weights into one model, which costs one
forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ummrm.errors import UmmrmError

OBJECTIVES = ("mean", "worst", "uncertainty")


def check_objective(objective: str, uncertainty_weight: float = 0.5) -> None:
    """Raise a clear error for an unknown objective or a negative uncertainty weight."""
    if objective not in OBJECTIVES:
        raise UmmrmError(f"unknown ensemble objective {objective!r}; use one of {', '.join(OBJECTIVES)}.")
    if uncertainty_weight < 0:
        raise UmmrmError(f"uncertainty_weight={uncertainty_weight} is invalid: it must be 0 or more.")


def combine_rewards(rewards, objective: str = "mean", uncertainty_weight: float = 0.5) -> torch.Tensor:
    """Combine member rewards of shape (members, items) into one reward per item."""
    check_objective(objective, uncertainty_weight)
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    if rewards.dim() != 2 or rewards.shape[0] == 0:
        raise UmmrmError(f"ensemble rewards must have shape (members, items) with at least one member; got {tuple(rewards.shape)}.")
    if objective == "mean":
        return rewards.mean(dim=0)
    if objective == "worst":
        return rewards.min(dim=0).values
    # population variance (divide by M), as in the uncertainty-weighted objective's definition
    return rewards.mean(dim=0) - uncertainty_weight * rewards.var(dim=0, unbiased=False)


def average_state_dicts(state_dicts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Return the element-wise mean of state dicts with the same keys and shapes (WARM)."""
    if not state_dicts:
        raise UmmrmError("weight averaging needs at least one model.")
    keys = list(state_dicts[0])
    for index, state in enumerate(state_dicts[1:], start=1):
        if list(state) != keys:
            missing = sorted(set(keys) ^ set(state))[:5]
            raise UmmrmError(f"model {index} has other parameters than model 0 (first differences: {missing}); WARM needs models of one architecture.")
    averaged = {}
    for key in keys:
        tensors = [state[key] for state in state_dicts]
        shapes = {tuple(tensor.shape) for tensor in tensors}
        if len(shapes) > 1:
            raise UmmrmError(f"parameter {key} has different shapes across models ({sorted(shapes)}); WARM needs models of one architecture.")
        if tensors[0].is_floating_point():
            averaged[key] = torch.stack([tensor.double() for tensor in tensors]).mean(dim=0).to(tensors[0].dtype)
        else:
            averaged[key] = tensors[0].clone()
    return averaged


def weight_average(references: Sequence[str], output: str | Path) -> None:
    """Average dense reward models of one architecture into a new folder (WARM)."""
    from ummrm.models import is_moe_folder, load_reward_model, save_reward_model

    if len(references) < 2:
        raise UmmrmError(f"WARM averages at least 2 reward models; got {len(references)}.")
    for reference in references:
        if is_moe_folder(reference):
            raise UmmrmError(f"{reference} is an MoE model; WARM averages dense models (merge the MoE model first).")
    models = []
    tokenizer = None
    for reference in references:
        model, tokenizer = load_reward_model(reference)
        models.append(model)
    averaged = average_state_dicts([model.state_dict() for model in models])
    target = models[0]
    target.load_state_dict(averaged)
    save_reward_model(target, tokenizer, output)
