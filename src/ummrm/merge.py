"""Merging an MoE reward model back into a dense one.

For every upcycled block and every weight tensor ``W`` of its MLP:

    W_merged = alpha * W_S + (1 - alpha) * sum_i beta_i * W_{E_i},   beta = softmax(theta) per block

computed as ``W_S + (1 - alpha) * sum_i beta_i * (W_{E_i} - W_S)``, which is the same because the
``beta_i`` sum to one, and which gives back ``W_S`` bit for bit when the experts are identical to it.

Methods (``MERGE_METHODS``):

- ``uniform``: ``beta_i = 1 / K``;
- ``frequency``: ``beta_i`` = the mean normalised routing weight expert ``i`` received on real tokens;
- ``learned``: ``theta`` starts from ``log`` of the frequencies and is trained with the Bradley-Terry
  loss of the merged dense model on a calibration split, every other weight frozen.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ummrm.errors import UmmrmError
from ummrm.families import decoder_layers
from ummrm.moe import MoEFeedForward, moe_layers, routing_mask

logger = logging.getLogger(__name__)

MERGE_METHODS = ("learned", "frequency", "uniform")
# frequencies of exactly zero would give theta = -inf; this floor keeps every expert reachable
FREQUENCY_FLOOR = 1e-6


@torch.no_grad()
def routing_statistics(model: nn.Module, batches) -> dict[int, torch.Tensor]:
    """Return, per MoE block, the mean normalised routing weight of each expert over real tokens.

    ``batches`` yields ``(input_ids, attention_mask)``. An expert not chosen for a token counts 0 for
    it, so each block's statistics sum to one.
    """
    from ummrm.rewards import compute_rewards

    layers = moe_layers(model)
    if not layers:
        raise UmmrmError("the model has no MoE layers; routing statistics need an upcycled model.")
    totals = {index: torch.zeros(moe.num_experts, dtype=torch.float64) for index, moe in layers}
    real_tokens = 0.0
    model.eval()
    for input_ids, attention_mask in batches:
        compute_rewards(model, input_ids, attention_mask)
        mask = routing_mask(attention_mask)
        real_tokens += mask.sum().item()
        for index, moe in layers:
            # built on the model's device; only the per-block sums come back to the CPU
            weights = torch.zeros(mask.shape[0], moe.num_experts, dtype=torch.float64, device=moe.selected_experts.device)
            weights.scatter_(1, moe.selected_experts, moe.routing_weights.double())
            totals[index] += weights[mask.to(weights.device)].sum(dim=0).cpu()
    if real_tokens == 0:
        raise UmmrmError("routing statistics saw no real tokens; give at least one non-empty pair.")
    return {index: (total / real_tokens).float() for index, total in totals.items()}


def merged_parameters(moe: MoEFeedForward, beta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return the merged MLP parameters of one MoE block for routed-expert weights ``beta`` (K,)."""
    shared = dict(moe.shared_expert.named_parameters())
    experts = [dict(expert.named_parameters()) for expert in moe.experts]
    merged = {}
    for name, base in shared.items():
        deltas = torch.stack([expert[name] - base for expert in experts])  # (K, *shape)
        beta_like_base = beta.to(device=base.device, dtype=base.dtype)
        merged[name] = base + (1.0 - moe.shared_rate) * torch.tensordot(beta_like_base, deltas, dims=1)
    return merged


def _dense_mlp(moe: MoEFeedForward, parameters: dict[str, torch.Tensor]) -> nn.Module:
    mlp = copy.deepcopy(moe.shared_expert)
    with torch.no_grad():
        for name, parameter in mlp.named_parameters():
            parameter.copy_(parameters[name])
    return mlp


def merge_model(model: nn.Module, betas: dict[int, torch.Tensor]) -> None:
    """Replace every MoE block of ``model`` by a dense MLP merged with ``betas[block]``, in place."""
    blocks = decoder_layers(model)
    for index, moe in moe_layers(model):
        if index not in betas:
            raise UmmrmError(f"no merge weights given for MoE block {index}.")
        beta = betas[index]
        _check_beta(beta, moe.num_experts, index)
        with torch.no_grad():
            blocks[index].mlp = _dense_mlp(moe, merged_parameters(moe, beta))
    model.moe_settings = None


def _check_beta(beta: torch.Tensor, num_experts: int, index: int) -> None:
    if beta.shape != (num_experts,):
        raise UmmrmError(f"merge weights for block {index} have shape {tuple(beta.shape)}; expected ({num_experts},).")
    # isfinite rejects NaN, which every `<` and `>` test lets through
    if not (torch.isfinite(beta).all() and (beta >= 0).all() and abs(beta.sum().item() - 1.0) <= 1e-4):
        raise UmmrmError(f"merge weights for block {index} must be non-negative and sum to 1, got {beta.tolist()}.")


def uniform_betas(model: nn.Module) -> dict[int, torch.Tensor]:
    return {index: torch.full((moe.num_experts,), 1.0 / moe.num_experts) for index, moe in moe_layers(model)}


def frequency_betas(statistics: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    return {index: frequencies / frequencies.sum() for index, frequencies in statistics.items()}


class LearnedMergeMLP(nn.Module):
    """A dense MLP whose weights are the merge of an MoE block's experts, with trainable ``theta``.

    The merged weights are recomputed from ``merge_logits`` (``theta``) on every forward pass and the
    MLP is run with them through ``torch.func.functional_call``, so the gradient reaches ``theta``
    while the experts stay frozen buffers.
    """

    def __init__(self, moe: MoEFeedForward, initial_beta: torch.Tensor):
        super().__init__()
        self.shared_rate = moe.shared_rate
        self.template = copy.deepcopy(moe.shared_expert).requires_grad_(False)
        self.names = [name for name, _ in moe.shared_expert.named_parameters()]
        for position, name in enumerate(self.names):
            base = dict(moe.shared_expert.named_parameters())[name].detach()
            deltas = torch.stack([dict(expert.named_parameters())[name].detach() - base for expert in moe.experts])
            self.register_buffer(f"base_{position}", base.clone())
            self.register_buffer(f"deltas_{position}", deltas)
        self.merge_logits = nn.Parameter(torch.log(initial_beta.clamp(min=FREQUENCY_FLOOR)))

    def beta(self) -> torch.Tensor:
        return F.softmax(self.merge_logits, dim=-1)

    def merged_parameters(self) -> dict[str, torch.Tensor]:
        beta = self.beta()
        merged = {}
        for position, name in enumerate(self.names):
            base = getattr(self, f"base_{position}")
            deltas = getattr(self, f"deltas_{position}")
            merged[name] = base + (1.0 - self.shared_rate) * torch.tensordot(beta.to(base.dtype), deltas, dims=1)
        return merged

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, self.merged_parameters(), (hidden_states,))

    def to_dense(self) -> nn.Module:
        mlp = copy.deepcopy(self.template)
        with torch.no_grad():
            merged = self.merged_parameters()
            for name, parameter in mlp.named_parameters():
                parameter.copy_(merged[name])
        return mlp.requires_grad_(True)


def prepare_learned_merge(model: nn.Module, initial_betas: dict[int, torch.Tensor]) -> None:
    """Replace every MoE block by a ``LearnedMergeMLP`` and freeze everything but the merge logits."""
    blocks = decoder_layers(model)
    for index, moe in moe_layers(model):
        blocks[index].mlp = LearnedMergeMLP(moe, initial_betas[index])
    model.moe_settings = None
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.endswith("merge_logits"))


def finish_learned_merge(model: nn.Module) -> dict[int, torch.Tensor]:
    """Replace every ``LearnedMergeMLP`` by a plain MLP with its merged weights; return the learned betas."""
    betas = {}
    for index, layer in enumerate(decoder_layers(model)):
        if isinstance(layer.mlp, LearnedMergeMLP):
            betas[index] = layer.mlp.beta().detach().clone()
            layer.mlp = layer.mlp.to_dense()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return betas
