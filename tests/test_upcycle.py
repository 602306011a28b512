"""Upcycling a dense reward model into MoE layers: equivalence, layer selection, errors and perturbation."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_batch, tiny_reward_model
from torch import nn

from ummrm.errors import UmmrmError
from ummrm.families import decoder_layers
from ummrm.moe import MoEFeedForward, moe_layers
from ummrm.rewards import compute_rewards
from ummrm.upcycle import resolve_layers, upcycle

# (num_experts, top_k, shared_rate) of unperturbed upcycles that must keep the dense model's rewards
UPCYCLE_SETTINGS = [(1, 1, 0.0), (4, 1, 0.5), (4, 2, 0.0), (4, 2, 1.0), (3, 3, 0.5), (8, 2, 0.25)]
REWARD_TOLERANCE = 1e-5

# parameters of each family's MLP that have a hidden-unit axis, written out here rather than read from
# ummrm.families so that the test checks that table
HIDDEN_UNIT_AXES = {
    "gated": {"gate_proj.weight": 0, "up_proj.weight": 0, "down_proj.weight": 1},
    "gpt_neox": {"dense_h_to_4h.weight": 0, "dense_h_to_4h.bias": 0, "dense_4h_to_h.weight": 1},
    "gpt2": {"c_fc.weight": 1, "c_fc.bias": 0, "c_proj.weight": 0},
}
# intermediate sizes of conftest's tiny models: 48 (gated), 64 (GPT-NeoX) and 4 * 32 (GPT-2)
INTERMEDIATE_SIZES = {"gated": 48, "gpt_neox": 64, "gpt2": 128}


def unit_family(family: str) -> str:
    return family if family in ("gpt_neox", "gpt2") else "gated"


@torch.no_grad()
def rewards_of(model) -> torch.Tensor:
    input_ids, attention_mask = random_batch(batch=4, length=12, seed=1)
    return compute_rewards(model, input_ids, attention_mask)


@torch.no_grad()
def randomise_mlp_biases(model) -> None:
    """Give every MLP bias random values.

    Hugging Face initialises biases to zero, and perturbation re-draws a unit with the tensor's mean and
    std, so a zero bias stays zero and would hide which of its units were re-initialised.
    """
    generator = torch.Generator().manual_seed(5)
    for layer in decoder_layers(model):
        for name, parameter in layer.mlp.named_parameters():
            if name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


def changed_units(expert: torch.Tensor, shared: torch.Tensor, axis: int) -> set[int]:
    """Return the indices along ``axis`` where the expert's tensor differs from the shared expert's."""
    different = expert != shared
    if different.dim() == 2:
        different = different.any(dim=1 - axis)
    return set(torch.nonzero(different).flatten().tolist())


# ---------------------------------------------------------------- equivalence with the dense model


def test_upcycled_equals_dense(family):
    dense = tiny_reward_model(family)
    expected = rewards_of(dense)

    for num_experts, top_k, shared_rate in UPCYCLE_SETTINGS:
        model = copy.deepcopy(dense)
        upcycle(model, num_experts=num_experts, top_k=top_k, shared_rate=shared_rate, layers="all", seed=1)
        rewards = rewards_of(model)

        case = f"{family}, K={num_experts}, top-{top_k}, shared_rate={shared_rate}"
        assert len(moe_layers(model)) == 3, f"{case}: {len(moe_layers(model))} MoE blocks instead of 3"
        difference = (rewards - expected).abs().max().item()
        assert difference < REWARD_TOLERANCE, f"{case}: rewards differ from the dense model's by {difference:.3g}"


def test_perturbed_upcycle_changes_rewards(family):
    # the equivalence test above can fail: perturbed experts move the rewards well past its tolerance
    dense = tiny_reward_model(family)
    model = copy.deepcopy(dense)
    upcycle(model, num_experts=4, top_k=2, shared_rate=0.0, perturb_fraction=1.0, seed=1)

    difference = (rewards_of(model) - rewards_of(dense)).abs().max().item()

    assert difference > 100 * REWARD_TOLERANCE, f"{family}: perturbed experts change the rewards by only {difference:.3g}"


def test_upcycle_selected_layers_only():
    model = tiny_reward_model("llama")

    settings = upcycle(model, num_experts=2, top_k=1, layers="last:1")

    blocks = decoder_layers(model)
    assert settings.layers == [2], f"settings name blocks {settings.layers}"
    assert [index for index, _ in moe_layers(model)] == [2], f"MoE blocks are {[i for i, _ in moe_layers(model)]}"
    assert type(blocks[0].mlp).__name__ == "LlamaMLP", f"block 0 has {type(blocks[0].mlp).__name__}"
    assert settings.mlp_class == "LlamaMLP", f"settings record MLP class {settings.mlp_class!r}"
    assert model.moe_settings is settings, "the model does not keep its MoE settings"


def test_upcycle_router_init():
    model = tiny_reward_model("llama")
    upcycle(model, num_experts=4, top_k=2, router_init_std=0.0)
    for index, moe in moe_layers(model):
        assert torch.count_nonzero(moe.router.weight).item() == 0, f"block {index}: router_init_std=0 left a non-zero router"

    model = tiny_reward_model("llama")
    upcycle(model, num_experts=4, top_k=2, router_init_std=0.5)
    for index, moe in moe_layers(model):
        # 4 * 32 = 128 draws: the sample standard deviation is within 20% of 0.5 with near certainty
        std = moe.router.weight.std().item()
        assert 0.4 < std < 0.6, f"block {index}: router weights have std {std:.3f}, expected about 0.5"


# ---------------------------------------------------------------- layer selection


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", [0, 1, 2, 3, 4, 5]),
        (" all ", [0, 1, 2, 3, 4, 5]),
        ("last:2", [4, 5]),
        ("last:6", [0, 1, 2, 3, 4, 5]),
        ("0,2", [0, 2]),
        ("5, 0, 2", [0, 2, 5]),
        ("-1", [5]),
        ("0,-2", [0, 4]),
        (2, [4, 5]),
        ([0, -1], [0, 5]),
        (("1", "3"), [1, 3]),
    ],
)
def test_resolve_layers(spec, expected):
    assert resolve_layers(spec, 6) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("last:0", r"N in 'last:N' must be between 1 and 6"),
        ("last:7", r"N in 'last:N' must be between 1 and 6"),
        ("last:x", r"N in 'last:N' must be between 1 and 6"),
        (0, r"N in 'last:N' must be between 1 and 6"),
        ("6", r"block 6 does not exist; the model has blocks 0 to 5"),
        ("-7", r"block -7 does not exist"),
        ("0,a", r"'a' is not a block index"),
        ("", r"selects no block"),
        (",", r"selects no block"),
        ([], r"selects no block"),
        ("1,1", r"names a block twice"),
        ("0,-6", r"names a block twice"),
        (True, r"layers=True is invalid"),
        (1.5, r"layers=1.5 is invalid"),
    ],
)
def test_resolve_layers_errors(spec, message):
    with pytest.raises(UmmrmError, match=message):
        resolve_layers(spec, 6)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_experts": 2, "top_k": 3}, r"top_k=3 is invalid; it must be between 1 and num_experts=2"),
        ({"num_experts": 2, "top_k": 0}, r"top_k=0 is invalid"),
        ({"num_experts": 0, "top_k": 1}, r"num_experts=0 is invalid"),
        ({"shared_rate": -0.1}, r"shared_rate=-0.1 is invalid; it is a mixing weight in \[0, 1\]"),
        ({"shared_rate": 1.5}, r"shared_rate=1.5 is invalid"),
        ({"router_init_std": -1.0}, r"router_init_std=-1.0 is invalid"),
        ({"perturb_fraction": 1.5}, r"perturb_fraction=1.5 is invalid"),
        ({"perturb_noise": -0.1}, r"perturb_noise=-0.1 is invalid"),
        ({"layers": "last:9"}, r"N in 'last:N' must be between 1 and 3"),
    ],
)
def test_upcycle_invalid_settings(options, message):
    model = tiny_reward_model("llama")

    with pytest.raises(UmmrmError, match=message):
        upcycle(model, **options)

    assert not moe_layers(model), "a rejected upcycle left MoE layers in the model"


def test_upcycle_twice_raises():
    model = tiny_reward_model("llama")
    upcycle(model)

    with pytest.raises(UmmrmError, match="already upcycled"):
        upcycle(model)


def test_unsupported_moe_model_raises():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(
        "qwen2_moe", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2, vocab_size=96, pad_token_id=0, num_labels=1, max_position_embeddings=128,
    )
    model = AutoModelForSequenceClassification.from_config(config)

    with pytest.raises(UmmrmError, match=r"unsupported feed-forward block Qwen2MoeSparseMoeBlock.*LlamaMLP.*GPT2MLP"):
        upcycle(model)


def test_unsupported_layout_raises():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    # OPT keeps its blocks at model.decoder.layers and its MLP as fc1/fc2 on the block itself
    config = AutoConfig.for_model(
        "opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
        vocab_size=96, pad_token_id=0, num_labels=1, max_position_embeddings=128,
    )
    model = AutoModelForSequenceClassification.from_config(config)

    with pytest.raises(UmmrmError, match=r"cannot find the transformer blocks of OPTForSequenceClassification.*LlamaMLP"):
        upcycle(model)


def test_unsupported_block_leaves_model_dense():
    model = tiny_reward_model("llama")
    decoder_layers(model)[2].mlp = nn.Identity()

    with pytest.raises(UmmrmError, match=r"unsupported feed-forward block Identity"):
        upcycle(model, layers="all")

    # blocks 0 and 1 are supported, but a failed upcycle must not convert them
    classes = [type(layer.mlp).__name__ for layer in decoder_layers(model)]
    assert classes == ["LlamaMLP", "LlamaMLP", "Identity"], f"MLP classes after the failed upcycle: {classes}"
    assert getattr(model, "moe_settings", None) is None, "a failed upcycle set moe_settings"


def test_block_without_mlp_raises():
    model = tiny_reward_model("llama")
    del decoder_layers(model)[1].mlp

    with pytest.raises(UmmrmError, match=r"transformer block 1 \(LlamaDecoderLayer\) has no `mlp` module"):
        upcycle(model, layers="0,1")


# ---------------------------------------------------------------- perturbation


def test_perturbation_reproducible():
    dense = tiny_reward_model("llama")
    options = dict(num_experts=3, top_k=2, perturb_fraction=0.25, perturb_noise=0.1)
    first, second, other = copy.deepcopy(dense), copy.deepcopy(dense), copy.deepcopy(dense)
    upcycle(first, seed=3, **options)
    upcycle(second, seed=3, **options)
    upcycle(other, seed=4, **options)

    first_state, second_state, other_state = first.state_dict(), second.state_dict(), other.state_dict()
    assert first_state.keys() == second_state.keys(), "two upcycles with one seed have different parameters"
    for name, tensor in first_state.items():
        assert torch.equal(tensor, second_state[name]), f"seed 3 gave two different values of {name}"
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"
    assert not torch.equal(first_state[name], other_state[name]), f"seeds 3 and 4 gave the same {name}"


def test_perturbed_experts_differ(family):
    model = tiny_reward_model(family)
    randomise_mlp_biases(model)
    upcycle(model, num_experts=3, top_k=2, perturb_fraction=0.25, seed=0)

    for index, moe in moe_layers(model):
        shared = dict(moe.shared_expert.named_parameters())
        experts = [dict(expert.named_parameters()) for expert in moe.experts]
        for name in HIDDEN_UNIT_AXES[unit_family(family)]:
            for number, expert in enumerate(experts):
                assert not torch.equal(expert[name], shared[name]), f"block {index} expert {number}: {name} equals the shared expert's"
            assert not torch.equal(experts[0][name], experts[1][name]), f"block {index}: experts 0 and 1 have the same {name}"


@pytest.mark.parametrize("fraction", [0.1, 0.25, 1.0])
def test_perturb_fraction_counts_units(family, fraction):
    # 0.1 of 48, 64 and 128 units rounds to 5, 6 and 13
    model = tiny_reward_model(family)
    randomise_mlp_biases(model)
    upcycle(model, num_experts=2, top_k=1, perturb_fraction=fraction, seed=0)
    axes = HIDDEN_UNIT_AXES[unit_family(family)]
    expected = round(fraction * INTERMEDIATE_SIZES[unit_family(family)])

    for index, moe in moe_layers(model):
        shared = dict(moe.shared_expert.named_parameters())
        for number, expert in enumerate(moe.experts):
            parameters = dict(expert.named_parameters())
            unit_sets = {name: changed_units(parameters[name], shared[name], axis) for name, axis in axes.items()}
            where = f"{family} block {index} expert {number}"
            for name, units in unit_sets.items():
                assert len(units) == expected, f"{where}: {len(units)} hidden units of {name} changed, expected {expected}"
            first = next(iter(unit_sets.values()))
            assert all(units == first for units in unit_sets.values()), f"{where}: tensors changed different units {unit_sets}"
            for name, tensor in parameters.items():
                if name not in axes:
                    assert torch.equal(tensor, shared[name]), f"{where}: {name} has no hidden-unit axis but changed"


def test_perturb_noise_relative_size():
    noise = 0.1
    model = tiny_reward_model("llama")
    upcycle(model, num_experts=2, top_k=1, perturb_noise=noise, seed=0)
    moe = decoder_layers(model)[0].mlp
    assert isinstance(moe, MoEFeedForward), f"block 0 holds {type(moe).__name__}"

    shared = moe.shared_expert.gate_proj.weight
    expert = moe.experts[0].gate_proj.weight
    # noise * std(W) * N(0, 1) on 48 * 32 entries: the ratio of sample stds is within 20% of `noise`
    ratio = ((expert - shared).std() / shared.std()).item()

    assert torch.count_nonzero(expert - shared).item() == shared.numel(), "noise left some weights unchanged"
    assert 0.8 * noise < ratio < 1.2 * noise, f"noise std relative to the weights' std is {ratio:.4f}, expected about {noise}"
