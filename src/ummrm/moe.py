"""The mixture-of-experts feed-forward layer of UMM-RM.

Notation: ``K`` routed experts, top-``k`` routing, shared-expert rate ``alpha``. For a token's hidden
state ``h``:

    p = softmax(W_r h)                                   router probabilities over the K routed experts
    g_i = p_i / sum_{j in topk(p)} p_j   for i in topk   routing-weight normalisation (``norm_topk_prob``)
    y = alpha * S(h) + (1 - alpha) * sum_{i in topk} g_i * E_i(h)

``S`` is the always-on shared expert. The names follow Hugging Face's MoE models (Qwen2-MoE, Mixtral):
``num_experts``, ``num_experts_per_tok``, ``shared_expert``, ``router_logits``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MoESettings:
    """The settings that define an upcycled model's MoE layers; saved as ``moe_config.json``."""

    num_experts: int
    num_experts_per_tok: int
    shared_rate: float
    layers: list[int]
    mlp_class: str = ""
    router_init_std: float = 0.02
    perturb_fraction: float = 0.0
    perturb_noise: float = 0.0
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class MoEFeedForward(nn.Module):
    """A feed-forward block made of one shared expert and ``num_experts`` routed experts.

    Each routed expert and the shared expert is a copy of the model's own MLP module, so the layer works
    for every supported MLP family without knowing its weights.

    The layer keeps the router logits and the chosen experts of its last forward pass
    (``router_logits``, ``selected_experts``). The load-balancing loss and the routing statistics are
    computed from them outside the layer, because only the caller has the attention mask that marks
    padding.
    """

    def __init__(
        self,
        mlp: nn.Module,
        hidden_size: int,
        num_experts: int,
        num_experts_per_tok: int,
        shared_rate: float,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.shared_rate = shared_rate
        self.shared_expert = copy.deepcopy(mlp)
        self.experts = nn.ModuleList(copy.deepcopy(mlp) for _ in range(num_experts))
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.router_logits: torch.Tensor | None = None
        self.selected_experts: torch.Tensor | None = None
        self.routing_weights: torch.Tensor | None = None

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return router logits (tokens, K), the top-k expert ids (tokens, k) and their normalised weights."""
        router_logits = self.router(hidden)
        # softmax in fp32: under bf16 the top-k order of near-equal probabilities is unstable
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        topk_probs, selected = torch.topk(probs, self.num_experts_per_tok, dim=-1)
        weights = topk_probs / topk_probs.sum(dim=-1, keepdim=True)
        return router_logits, selected, weights.to(hidden.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, shape[-1])  # (tokens, hidden)
        router_logits, selected, weights = self.route(hidden)
        self._keep_routing(router_logits, selected, weights)

        # group the (token, slot) assignments by expert with one stable sort, so that each expert runs
        # once on exactly the tokens routed to it
        num_tokens = hidden.shape[0]
        flat_experts = selected.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        slot_tokens = torch.arange(num_tokens, device=hidden.device).repeat_interleave(self.num_experts_per_tok)
        sorted_tokens = slot_tokens[order]
        sorted_weights = weights.reshape(-1)[order]
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()

        routed = torch.zeros_like(hidden)
        start = 0
        for expert_index, count in enumerate(counts):
            if count == 0:
                continue
            tokens = sorted_tokens[start : start + count]
            expert_out = self.experts[expert_index](hidden[tokens])
            routed.index_add_(0, tokens, expert_out * sorted_weights[start : start + count, None])
            start += count

        output = self.shared_rate * self.shared_expert(hidden) + (1.0 - self.shared_rate) * routed
        return output.reshape(shape)

    def forward_reference(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Compute the same output by running every expert on every token; for tests only."""
        shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, shape[-1])
        _, selected, weights = self.route(hidden)
        dense_weights = torch.zeros(hidden.shape[0], self.num_experts, dtype=hidden.dtype, device=hidden.device)
        dense_weights.scatter_(1, selected, weights)
        all_outputs = torch.stack([expert(hidden) for expert in self.experts], dim=1)  # (tokens, K, hidden)
        routed = (dense_weights[..., None] * all_outputs).sum(dim=1)
        output = self.shared_rate * self.shared_expert(hidden) + (1.0 - self.shared_rate) * routed
        return output.reshape(shape)

    def _keep_routing(self, router_logits: torch.Tensor, selected: torch.Tensor, weights: torch.Tensor) -> None:
        self.router_logits = router_logits
        self.selected_experts = selected
        self.routing_weights = weights


def moe_layers(model: nn.Module) -> list[tuple[int, MoEFeedForward]]:
    """Return ``(block index, MoE layer)`` for every MoE feed-forward block of a model, in order."""
    from ummrm.families import decoder_layers

    found = []
    for index, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, MoEFeedForward):
            found.append((index, mlp))
    return found


def routing_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Flatten a (batch, seq) attention mask to the (tokens,) boolean mask of real tokens."""
    return attention_mask.reshape(-1).bool()
