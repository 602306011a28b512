"""Merging MoE experts back into a dense MLP: the formula by hand, exactness, learned merge, routing statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_batch, tiny_reward_model
from torch.func import functional_call
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from ummrm.errors import UmmrmError
from ummrm.families import decoder_layers
from ummrm.merge import (
    LearnedMergeMLP,
    finish_learned_merge,
    frequency_betas,
    merge_model,
    merged_parameters,
    prepare_learned_merge,
    routing_statistics,
    uniform_betas,
)
from ummrm.moe import MoEFeedForward, moe_layers
from ummrm.rewards import compute_rewards
from ummrm.upcycle import upcycle

HIDDEN = 4
TOLERANCE = 1e-6
# merge weights (K = 4) for the exactness tests: uniform, arbitrary, and one that ignores two experts
BETAS = [[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4], [0.0, 0.7, 0.3, 0.0]]


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def small_moe(num_experts: int = 3, shared_rate: float = 0.25, seed: int = 0) -> MoEFeedForward:
    """Return an MoE layer over a 4-to-6 LlamaMLP whose shared and routed experts have different random weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=6, num_attention_heads=2, num_key_value_heads=2)
    moe = MoEFeedForward(LlamaMLP(config), HIDDEN, num_experts, 1, shared_rate)
    with torch.no_grad():
        for parameter in moe.parameters():
            parameter.normal_()
    return moe.eval()


def hand_merge(moe: MoEFeedForward, beta: list[float]) -> dict[str, torch.Tensor]:
    """Compute alpha * W_S + (1 - alpha) * sum_i beta_i W_i for every MLP weight, the formula as written."""
    alpha = moe.shared_rate
    merged = {}
    for name, shared in moe.shared_expert.named_parameters():
        routed = torch.zeros_like(shared)
        for weight, expert in zip(beta, moe.experts):
            routed = routed + weight * expert.get_parameter(name)
        merged[name] = (alpha * shared + (1 - alpha) * routed).detach()
    return merged


@torch.no_grad()
def rewards_of(model, length: int = 12) -> torch.Tensor:
    input_ids, attention_mask = random_batch(batch=4, length=length, seed=1)
    return compute_rewards(model, input_ids, attention_mask)


# ---------------------------------------------------------------- the merge formula


def test_merged_parameters_constant_experts():
    moe = small_moe(num_experts=3, shared_rate=0.25)
    with torch.no_grad():
        for parameter in moe.shared_expert.parameters():
            parameter.fill_(1.0)
        for value, expert in zip([2.0, 3.0, 5.0], moe.experts):
            for parameter in expert.parameters():
                parameter.fill_(value)

    # 0.25 * 1 + 0.75 * (0.5 * 2 + 0.3 * 3 + 0.2 * 5) = 0.25 + 0.75 * 2.9 = 2.425
    merged = merged_parameters(moe, torch.tensor([0.5, 0.3, 0.2]))

    assert sorted(merged) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"], f"merged names {sorted(merged)}"
    for name, tensor in merged.items():
        difference = max_difference(tensor, torch.full_like(tensor, 2.425))
        assert difference < TOLERANCE, f"{name}: merged values differ from 2.425 by {difference:.3g}"


@pytest.mark.parametrize("shared_rate", [0.0, 0.25, 1.0])
def test_merged_parameters_random_experts(shared_rate):
    moe = small_moe(num_experts=3, shared_rate=shared_rate)
    beta = [0.6, 0.1, 0.3]

    merged = merged_parameters(moe, torch.tensor(beta))
    expected = hand_merge(moe, beta)

    for name in expected:
        difference = max_difference(merged[name], expected[name])
        assert difference < TOLERANCE, f"shared_rate={shared_rate}, {name}: merge differs from the formula by {difference:.3g}"


def test_learned_merge_forward_by_hand():
    moe = small_moe(num_experts=3, shared_rate=0.25)
    beta = [0.6, 0.1, 0.3]
    learned = LearnedMergeMLP(moe, torch.tensor(beta))
    hidden = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1))

    expected_weights = hand_merge(moe, beta)
    expected = functional_call(moe.shared_expert, expected_weights, (hidden,))
    output = learned(hidden)

    learned_beta = learned.beta().detach()
    assert max_difference(learned_beta, torch.tensor(beta)) < TOLERANCE, f"initial beta {learned_beta.tolist()} != {beta}"
    difference = max_difference(output, expected)
    assert difference < TOLERANCE, f"learned-merge output differs from the hand-merged MLP by {difference:.3g}"


def test_learned_merge_to_dense_by_hand():
    moe = small_moe(num_experts=3, shared_rate=0.25)
    beta = [0.6, 0.1, 0.3]

    dense = LearnedMergeMLP(moe, torch.tensor(beta)).to_dense()
    expected = hand_merge(moe, beta)

    assert isinstance(dense, LlamaMLP), f"to_dense returned {type(dense).__name__}"
    for name, parameter in dense.named_parameters():
        difference = max_difference(parameter.detach(), expected[name])
        assert difference < TOLERANCE, f"{name}: dense weights differ from the hand merge by {difference:.3g}"
        assert parameter.requires_grad, f"{name} of the dense MLP does not require grad"


def test_learned_merge_gradient_needs_different_experts():
    hidden = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1))

    different = LearnedMergeMLP(small_moe(num_experts=3), torch.tensor([0.6, 0.1, 0.3]))
    different(hidden).square().sum().backward()
    gradient = different.merge_logits.grad
    assert gradient is not None, "merge_logits got no gradient"
    assert gradient.abs().max().item() > 1e-4, f"merge_logits gradient {gradient.tolist()} is zero for different experts"

    # experts that are copies of the shared expert make every merge the same MLP, so theta has no effect
    moe = small_moe(num_experts=3)
    for expert in moe.experts:
        expert.load_state_dict(moe.shared_expert.state_dict())
    identical = LearnedMergeMLP(moe, torch.tensor([0.6, 0.1, 0.3]))
    identical(hidden).square().sum().backward()
    gradient = identical.merge_logits.grad
    assert gradient is not None, "merge_logits got no gradient"
    assert torch.count_nonzero(gradient).item() == 0, f"merge_logits gradient {gradient.tolist()} is non-zero for identical experts"

    trainable = [name for name, parameter in identical.named_parameters() if parameter.requires_grad]
    assert trainable == ["merge_logits"], f"trainable parameters of a learned merge: {trainable}"


# ---------------------------------------------------------------- merging a model


def test_merge_untouched_experts_exact(family):
    dense = tiny_reward_model(family)
    expected_rewards = rewards_of(dense)
    dense_blocks = decoder_layers(dense)

    for shared_rate in (0.0, 0.5, 1.0):
        upcycled = copy.deepcopy(dense)
        upcycle(upcycled, num_experts=4, top_k=2, shared_rate=shared_rate, seed=2)
        for beta in BETAS:
            model = copy.deepcopy(upcycled)
            merge_model(model, {index: torch.tensor(beta) for index, _ in moe_layers(model)})

            case = f"{family}, shared_rate={shared_rate}, beta={beta}"
            assert not moe_layers(model), f"{case}: MoE layers remain after the merge"
            assert model.moe_settings is None, f"{case}: the merged model still has MoE settings"
            for index, (block, dense_block) in enumerate(zip(decoder_layers(model), dense_blocks)):
                assert type(block.mlp) is type(dense_block.mlp), f"{case}: block {index} holds {type(block.mlp).__name__}"
                merged = dict(block.mlp.named_parameters())
                for name, parameter in dense_block.mlp.named_parameters():
                    assert torch.equal(merged[name], parameter), (
                        f"{case}: block {index} {name} differs from the dense weights by "
                        f"{max_difference(merged[name], parameter):.3g}"
                    )
            rewards = rewards_of(model)
            assert torch.equal(rewards, expected_rewards), (
                f"{case}: rewards differ from the dense model's by {max_difference(rewards, expected_rewards):.3g}"
            )


def test_merge_model_equals_hand_merge():
    model = tiny_reward_model("llama")
    upcycle(model, num_experts=3, top_k=2, shared_rate=0.5, perturb_fraction=0.5, seed=0)
    beta = [0.2, 0.5, 0.3]
    expected = {index: hand_merge(moe, beta) for index, moe in moe_layers(model)}

    merge_model(model, {index: torch.tensor(beta) for index in expected})

    for index, weights in expected.items():
        merged = dict(decoder_layers(model)[index].mlp.named_parameters())
        for name, tensor in weights.items():
            difference = max_difference(merged[name].detach(), tensor)
            assert difference < TOLERANCE, f"block {index} {name}: merged model differs from the hand merge by {difference:.3g}"


@pytest.mark.parametrize(
    ("betas", "message"),
    [
        ({0: [0.5, 0.5, 0.0]}, r"no merge weights given for MoE block 1"),
        ({0: [0.5, 0.5], 1: [0.5, 0.5], 2: [0.5, 0.5]}, r"merge weights for block 0 have shape \(2,\); expected \(3,\)"),
        ({0: [1.5, -0.5, 0.0], 1: [1.0, 0.0, 0.0], 2: [1.0, 0.0, 0.0]}, r"block 0 must be non-negative and sum to 1"),
        ({0: [0.5, 0.2, 0.2], 1: [1.0, 0.0, 0.0], 2: [1.0, 0.0, 0.0]}, r"block 0 must be non-negative and sum to 1"),
        ({0: [float("nan"), 0.5, 0.5], 1: [1.0, 0.0, 0.0], 2: [1.0, 0.0, 0.0]}, r"block 0 must be non-negative and sum to 1"),
    ],
)
def test_merge_model_invalid_betas(betas, message):
    model = tiny_reward_model("llama")
    upcycle(model, num_experts=3, top_k=1)

    with pytest.raises(UmmrmError, match=message):
        merge_model(model, {index: torch.tensor(beta) for index, beta in betas.items()})


def test_uniform_betas():
    model = tiny_reward_model("llama")
    upcycle(model, num_experts=4, top_k=1, layers="0,2")

    betas = uniform_betas(model)

    assert sorted(betas) == [0, 2], f"uniform betas for blocks {sorted(betas)}"
    for index, beta in betas.items():
        assert max_difference(beta, torch.full((4,), 0.25)) < TOLERANCE, f"block {index}: uniform beta {beta.tolist()}"


def test_frequency_betas_normalise():
    betas = frequency_betas({1: torch.tensor([1.0, 3.0, 0.0, 4.0])})

    expected = torch.tensor([0.125, 0.375, 0.0, 0.5])
    assert max_difference(betas[1], expected) < TOLERANCE, f"frequency betas {betas[1].tolist()} != {expected.tolist()}"


def test_learned_merge_model_round_trip():
    model = tiny_reward_model("llama")
    upcycle(model, num_experts=3, top_k=2, shared_rate=0.5, perturb_fraction=0.5, seed=0)
    betas = {index: torch.tensor([0.2, 0.5, 0.3]) for index, _ in moe_layers(model)}
    reference = copy.deepcopy(model)
    merge_model(reference, betas)

    prepare_learned_merge(model, betas)

    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert len(trainable) == 3, f"trainable parameters after prepare_learned_merge: {trainable}"
    assert all(name.endswith("merge_logits") for name in trainable), f"trainable parameters: {trainable}"
    difference = max_difference(rewards_of(model), rewards_of(reference))
    assert difference < TOLERANCE, f"learned-merge rewards differ from merge_model's by {difference:.3g}"

    learned = finish_learned_merge(model)

    assert sorted(learned) == sorted(betas), f"finish_learned_merge returned betas for blocks {sorted(learned)}"
    for index, beta in learned.items():
        assert max_difference(beta, betas[index]) < TOLERANCE, f"block {index}: learned beta {beta.tolist()}"
    classes = {type(layer.mlp).__name__ for layer in decoder_layers(model)}
    assert classes == {"LlamaMLP"}, f"MLP classes after finish_learned_merge: {classes}"
    assert all(parameter.requires_grad for parameter in model.parameters()), "a parameter stayed frozen"
    difference = max_difference(rewards_of(model), rewards_of(reference))
    assert difference < TOLERANCE, f"the finished learned merge differs from merge_model by {difference:.3g}"


# ---------------------------------------------------------------- routing statistics


def routed_model(**options):
    model = tiny_reward_model("llama")
    settings = dict(num_experts=4, top_k=2, router_init_std=1.0, perturb_fraction=0.5, seed=0)
    upcycle(model, **{**settings, **options})
    return model


def test_routing_statistics_sum_to_one():
    model = routed_model(layers="last:2")

    statistics = routing_statistics(model, [random_batch(batch=3, length=10, seed=0), random_batch(batch=2, length=7, seed=1)])

    assert sorted(statistics) == [1, 2], f"statistics for blocks {sorted(statistics)}"
    for index, frequencies in statistics.items():
        total = frequencies.sum().item()
        assert frequencies.shape == (4,), f"block {index}: statistics shape {tuple(frequencies.shape)}"
        assert abs(total - 1.0) < TOLERANCE, f"block {index}: statistics sum to {total}"
        assert (frequencies >= 0).all(), f"block {index}: negative frequency in {frequencies.tolist()}"


def test_routing_statistics_ignore_padding():
    model = routed_model()
    input_ids, attention_mask = random_batch(batch=3, length=10, seed=0)
    # five more pad columns, with token ids that would route differently if they were counted
    padded_ids = torch.cat([input_ids, torch.randint(1, 96, (3, 5), generator=torch.Generator().manual_seed(3))], dim=1)
    padded_mask = torch.cat([attention_mask, torch.zeros(3, 5, dtype=torch.long)], dim=1)

    statistics = routing_statistics(model, [(input_ids, attention_mask)])
    padded = routing_statistics(model, [(padded_ids, padded_mask)])

    for index in statistics:
        difference = max_difference(statistics[index], padded[index])
        assert difference < TOLERANCE, f"block {index}: padding changed the statistics by {difference:.3g}"


def test_routing_statistics_uniform_router():
    # a zero router gives every expert probability 1/K, so with top_k == K every expert gets weight 1/K
    model = routed_model(router_init_std=0.0, top_k=4)

    statistics = routing_statistics(model, [random_batch(batch=3, length=10, seed=0)])

    for index, frequencies in statistics.items():
        difference = max_difference(frequencies, torch.full((4,), 0.25))
        assert difference < TOLERANCE, f"block {index}: statistics {frequencies.tolist()} != 1/4 each"


def test_routing_statistics_errors():
    with pytest.raises(UmmrmError, match=r"the model has no MoE layers"):
        routing_statistics(tiny_reward_model("llama"), [random_batch()])

    input_ids, attention_mask = random_batch()
    with pytest.raises(UmmrmError, match=r"routing statistics saw no real tokens"):
        routing_statistics(routed_model(), [(input_ids, torch.zeros_like(attention_mask))])
