"""Shared fixtures: tiny random models of every supported MLP family, built in code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# in CI nothing that needs ../shared/data or the real model may skip
IN_CI = os.environ.get("CI", "").lower() in ("1", "true")

# tiny models run thousands of times faster on one thread than on two contended ones
torch.set_num_threads(1)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gpt2")


def tiny_config(family: str):
    from transformers import AutoConfig

    common = dict(vocab_size=96, pad_token_id=0, num_labels=1)
    if family == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_embd=32, n_layer=3, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=1, **common
        )
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


CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + ' <eos> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)
WORDS = "the a cat dog sat on mat good bad answer question hello world yes no why because it is fine".split()


def tiny_tokenizer(chat_template: bool = True):
    """Return a whitespace word-level fast tokenizer with an eos token, no pad token and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]
    vocab = {token: index for index, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_base_model(folder: Path, family: str = "llama", chat_template: bool = True, seed: int = 0) -> Path:
    """Save a tiny random causal LM and its tokenizer as a Hugging Face folder; return the folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tiny_tokenizer(chat_template).save_pretrained(folder)
    return folder
