"""Losses of reward-model training: Bradley-Terry, reward centring and the MoE load-balancing loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Return the mean of ``-log sigmoid(r_chosen - r_rejected)`` over pairs."""
    # logsigmoid is the stable form of log(sigmoid(x)) for large negative margins
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def centering_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Return ``mean((r_chosen + r_rejected)^2)``, which keeps rewards centred on zero."""
    return ((chosen_rewards + rejected_rewards) ** 2).mean()


def expert_slot_fractions(selected_experts: torch.Tensor, token_mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Return ``F_i``: the fraction of routed slots of real tokens that went to expert ``i``.

    ``selected_experts`` is (tokens, k) and ``token_mask`` (tokens,) marks real tokens. The counts are
    divided by ``tokens * k``, so the fractions sum to one for any ``k``.
    """
    top_k = selected_experts.shape[-1]
    mask = token_mask.to(torch.float32)
    one_hot = F.one_hot(selected_experts, num_experts).to(torch.float32).sum(dim=1)  # (tokens, K)
    counts = (one_hot * mask[:, None]).sum(dim=0)
    return counts / (mask.sum().clamp(min=1.0) * top_k)


def load_balancing_loss(
    router_logits: torch.Tensor, selected_experts: torch.Tensor, token_mask: torch.Tensor
) -> torch.Tensor:
    """Return the load-balancing loss ``K * sum_i F_i * P_i`` of one MoE layer, over real tokens only.

    ``F_i`` is the fraction of routed slots that went to expert ``i`` (see ``expert_slot_fractions``)
    and ``P_i`` the mean router probability of expert ``i``. Both sum to one, so the loss is 1.0 under
    perfectly balanced routing for any top-k, and approaches ``K`` when every token goes to one expert.
    Only ``P`` carries a gradient, as in Switch Transformers (Fedus et al., 2021).
    """
    num_experts = router_logits.shape[-1]
    mask = token_mask.to(torch.float32)
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    mean_probs = (probs * mask[:, None]).sum(dim=0) / mask.sum().clamp(min=1.0)
    fractions = expert_slot_fractions(selected_experts, token_mask, num_experts)
    return num_experts * (fractions * mean_probs).sum()
