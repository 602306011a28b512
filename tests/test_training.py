"""The reward-model Trainer: loss terms, logged routing, collapse warnings, freezing and resumption."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_reward_model

from ummrm.errors import UmmrmError
from ummrm.losses import bradley_terry_loss, centering_loss, load_balancing_loss
from ummrm.moe import moe_layers, routing_mask
from ummrm.rewards import EncodedPair, compute_rewards
from ummrm.training import PairCollator, TrainSettings, _trainer_class, freeze_lower_layers, train_reward_model, training_arguments
from ummrm.upcycle import upcycle


def encoded_pairs(count: int = 12, seed: int = 0) -> list[EncodedPair]:
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for row in range(count):
        prompt = torch.randint(3, 90, (4 + row % 3,), generator=generator).tolist()
        pairs.append(EncodedPair(prompt + [5, 6, 7], prompt + [8, 9], row))
    return pairs


def build_trainer(model, settings: TrainSettings, tmp_path):
    return _trainer_class()(
        model=model, args=training_arguments(tmp_path, settings, save_checkpoints=False),
        data_collator=PairCollator(0), settings=settings,
    )


def test_loss_is_bradley_terry_plus_terms(tmp_path):
    model = tiny_reward_model("llama")
    upcycle(model, num_experts=3, top_k=1, layers="last:2", router_init_std=0.5)
    settings = TrainSettings(center_coef=0.1, router_aux_loss_coef=0.2)
    trainer = build_trainer(model, settings, tmp_path)
    batch = PairCollator(0)([{"chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in encoded_pairs(4)])

    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        rewards = compute_rewards(model, batch["input_ids"], batch["attention_mask"])
        chosen, rejected = rewards.chunk(2)
        mask = routing_mask(batch["attention_mask"])
        aux = torch.stack([load_balancing_loss(moe.router_logits, moe.selected_experts, mask) for _, moe in moe_layers(model)]).mean()
    expected = bradley_terry_loss(chosen, rejected) + 0.1 * centering_loss(chosen, rejected) + 0.2 * aux
    assert torch.allclose(loss, expected, atol=1e-6), f"loss {loss.item()} expected {expected.item()}"


def test_logs_accuracy_margin_and_shares(tmp_path):
    model = tiny_reward_model("llama")
    upcycle(model, num_experts=3, top_k=2, layers="last:1")
    trainer = build_trainer(model, TrainSettings(router_aux_loss_coef=0.01), tmp_path)
    batch = PairCollator(0)([{"chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in encoded_pairs(4)])
    with torch.no_grad():
        trainer.compute_loss(model, batch)
    trainer.log({"loss": 0.5})
    logged = trainer.state.log_history[-1]
    for key in ("accuracy", "margin", "rewards/chosen", "rewards/rejected", "aux_loss"):
        assert key in logged, key
    shares = [logged[f"share/b2/e{expert}"] for expert in range(3)]
    assert abs(sum(shares) - 1.0) < 1e-6, shares


def test_collapsed_routing_warns_once(tmp_path, caplog):
    model = tiny_reward_model("llama")
    upcycle(model, num_experts=4, top_k=1, layers="last:1")
    moe = moe_layers(model)[0][1]
    original_route = moe.route

    # route every token to expert 2, as a collapsed router would

    def route_to_two(hidden):
        logits, selected, weights = original_route(hidden)
        forced = torch.full_like(selected, 2)
        return logits, forced, torch.ones_like(weights)

    moe.route = route_to_two
    trainer = build_trainer(model, TrainSettings(collapse_threshold=0.95), tmp_path)
    batch = PairCollator(0)([{"chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in encoded_pairs(4)])
    with caplog.at_level(logging.WARNING, logger="ummrm.training"):
        for _ in range(2):
            with torch.no_grad():
                trainer.compute_loss(model, batch)
            trainer.log({"loss": 0.5})
    warnings = [record for record in caplog.records if "has collapsed" in record.message]
    assert len(warnings) == 1
    assert "block 2" in warnings[0].message


def test_freeze_keeps_last_blocks_and_head():
    model = tiny_reward_model("llama")
    count = freeze_lower_layers(model, 1)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert "score.weight" in trainable
    assert "model.norm.weight" in trainable
    assert any(name.startswith("model.layers.2.") for name in trainable)
    assert not any(name.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens")) for name in trainable)
    assert count == sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def test_freeze_too_many_layers():
    with pytest.raises(UmmrmError, match="trainable_layers=9 is larger"):
        freeze_lower_layers(tiny_reward_model("llama"), 9)


def test_training_lowers_loss(tmp_path):
    model = tiny_reward_model("gpt2")
    pairs = encoded_pairs(16)
    settings = TrainSettings(learning_rate=5e-3, epochs=3, batch_size=4, logging_steps=100)
    summary = train_reward_model(model, 0, pairs, tmp_path / "checkpoints", settings, save_checkpoints=False)
    model.eval()
    batch = PairCollator(0)([{"chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in pairs])
    with torch.no_grad():
        chosen, rejected = compute_rewards(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
    assert summary["steps"] == 12
    assert bradley_terry_loss(chosen, rejected).item() < 0.5


def test_interrupted_training_resumes(tmp_path, caplog):
    from transformers import Trainer

    settings = TrainSettings(learning_rate=1e-3, epochs=1, batch_size=2, save_steps=2, logging_steps=100)
    pairs = encoded_pairs(12)
    real_step = Trainer.training_step
    calls = {"count": 0}

    def failing_step(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 4:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, *args, **kwargs)

    Trainer.training_step = failing_step
    try:
        with pytest.raises(KeyboardInterrupt):
            train_reward_model(tiny_reward_model("llama"), 0, pairs, tmp_path, settings)
    finally:
        Trainer.training_step = real_step
    assert (tmp_path / "checkpoint-2").is_dir()

    with caplog.at_level(logging.INFO, logger="ummrm.training"):
        summary = train_reward_model(tiny_reward_model("llama"), 0, pairs, tmp_path, settings)
    assert any("resuming from checkpoint" in record.message and "checkpoint-2" in record.message for record in caplog.records)
    assert summary["steps"] == 6
