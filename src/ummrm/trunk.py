"""Scoring many reward models that share a frozen trunk, computing the trunk once.

Reward models trained with ``trainable_layers: N`` from one base model (and MoE models upcycled in
their last blocks) have identical embeddings and identical lower blocks. When several of them score
the same token sequences, the hidden states entering the first block that differs are the same for
all of them. ``TrunkCache`` stores those hidden states while the first model scores, then runs every
later model from that block on, which on a 30-block model with 4 trained blocks is several times
faster.

The cache is used for a model only when its embeddings and lower blocks are equal, tensor by tensor,
to those of the model that filled it, and when every sequence is in the cache. The first batch of
every model that uses it is also scored the ordinary way, and a difference above ``TOLERANCE``
turns the cache off for that model. So a family whose forward does something between the embeddings
and the first block (GPT-2 adds position embeddings there) is scored correctly, only without the
speed-up.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from ummrm.families import decoder_layers
from ummrm.rewards import compute_rewards, last_token_index, pad_sequences

logger = logging.getLogger(__name__)

# largest reward difference (fp32) accepted between the cached and the ordinary forward
TOLERANCE = 1e-4


def _layers_attribute(model: nn.Module) -> tuple[nn.Module, str]:
    """Return (module, attribute name) that holds the decoder blocks."""
    layers = decoder_layers(model)
    for module in model.modules():
        for name, child in module.named_children():
            if child is layers:
                return module, name
    raise RuntimeError("the decoder blocks are not a child of any module")


def _trunk_tensors(model: nn.Module, depth: int) -> dict[str, torch.Tensor]:
    """Return the embedding tensors and those of the first ``depth`` blocks, by name."""
    layers = decoder_layers(model)
    tensors = {f"embeddings.{name}": tensor for name, tensor in model.get_input_embeddings().state_dict().items()}
    for index in range(depth):
        tensors.update({f"layers.{index}.{name}": tensor for name, tensor in layers[index].state_dict().items()})
    return tensors


class TrunkCache:
    """Hidden states entering block ``depth``, per token sequence, shared by models with equal trunks."""

    def __init__(self, depth: int):
        self.depth = depth
        self.reference: dict[str, torch.Tensor] | None = None
        self.hidden: dict[tuple[int, ...], torch.Tensor] = {}
        self.uses = {"filled": 0, "replayed": 0, "plain": 0}

    def shares_trunk(self, model: nn.Module) -> bool:
        if self.reference is None or len(decoder_layers(model)) <= self.depth:
            return False
        tensors = _trunk_tensors(model, self.depth)
        return tensors.keys() == self.reference.keys() and all(torch.equal(tensors[name], self.reference[name]) for name in tensors)

    @torch.no_grad()
    def score(self, model: nn.Module, sequences: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 16) -> list[float]:
        """Return the reward of each sequence, filling the cache or reading from it where that is safe."""
        model.eval()
        keys = [tuple(sequence) for sequence in sequences]
        if self.depth < 1 or len(decoder_layers(model)) <= self.depth:
            mode = "plain"
        elif self.reference is None:
            mode = "fill"
        elif self.shares_trunk(model) and all(key in self.hidden for key in keys):
            mode = "replay"
        else:
            mode = "plain"
        if mode == "fill":
            self.reference = {name: tensor.detach().clone() for name, tensor in _trunk_tensors(model, self.depth).items()}

        rewards = [0.0] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda index: len(sequences[index]))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, attention_mask = pad_sequences([sequences[i] for i in batch], pad_token_id)
            if mode == "replay":
                values = self._replay(model, [keys[i] for i in batch], attention_mask)
                if start == 0:
                    expected = compute_rewards(model, input_ids, attention_mask)
                    difference = (values - expected).abs().max().item()
                    if difference > TOLERANCE:
                        logger.warning("the trunk cache gives rewards that differ by %.3g from the ordinary forward; scoring this model without it", difference)
                        mode, values = "plain", expected
            elif mode == "fill":
                values = self._fill(model, [keys[i] for i in batch], input_ids, attention_mask)
            else:
                values = compute_rewards(model, input_ids, attention_mask)
            for index, value in zip(batch, values.tolist()):
                rewards[index] = value
        self.uses[{"fill": "filled", "replay": "replayed", "plain": "plain"}[mode]] += 1
        logger.info("scored %d sequences (trunk cache at block %d: %s)", len(sequences), self.depth, mode)
        return rewards

    def _fill(self, model: nn.Module, keys: list[tuple[int, ...]], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        captured = {}

        def capture(module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]

        handle = decoder_layers(model)[self.depth].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            values = compute_rewards(model, input_ids, attention_mask)
        finally:
            handle.remove()
        lengths = attention_mask.sum(dim=1).tolist()
        for row, key in enumerate(keys):
            # right padding: the real tokens are the first `length` positions
            self.hidden[key] = captured["hidden"][row, : lengths[row]].detach().clone()
        return values

    def _replay(self, model: nn.Module, keys: list[tuple[int, ...]], attention_mask: torch.Tensor) -> torch.Tensor:
        first = self.hidden[keys[0]]
        embeds = first.new_zeros((len(keys), attention_mask.shape[1], first.shape[-1]))
        for row, key in enumerate(keys):
            embeds[row, : len(key)] = self.hidden[key]
        parent, name = _layers_attribute(model)
        layers = getattr(parent, name)
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
        setattr(parent, name, nn.ModuleList(list(layers)[self.depth :]))
        try:
            # the blocks below `depth` are skipped: their output is the cached hidden state
            outputs = model.base_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        finally:
            setattr(parent, name, layers)
        hidden = outputs.last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return model.score(hidden[rows, last_token_index(attention_mask)]).squeeze(-1).float()
