"""Shared fixtures: tiny random models of every supported MLP family, built in code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gpt2")


def tiny_config(family: str):
    from transformers import AutoConfig

    common = dict(vocab_size=96, pad_token_id=0, num_labels=1)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=32, n_layer=3, n_head=4, n_positions=128, **common)
    if family == "gpt_neox":
        return AutoConfig.for_model(
            "gpt_neox", hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128, **common,
        )
    return AutoConfig.for_model(
        family, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=128, head_dim=8, **common,
    )


def tiny_reward_model(family: str = "llama", seed: int = 0):
    """Return a tiny random sequence-classification model in eval mode, fp32, seeded."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(family), dtype=torch.float32)
    return model.eval()


def random_batch(batch: int = 3, length: int = 10, vocab: int = 96, seed: int = 0):
    """Return right-padded random token ids and attention mask with rows of different lengths."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        real = length - 2 * row
        attention_mask[row, real:] = 0
        input_ids[row, real:] = 0
    return input_ids, attention_mask


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
