"""The MoE feed-forward layer: grouped dispatch against running every expert on every token."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, LlamaConfig
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.llama.modeling_llama import LlamaMLP

from ummrm.moe import MoEFeedForward, routing_mask

HIDDEN = 8
NUM_EXPERTS = 4
TOLERANCE = 1e-6


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def llama_mlp() -> LlamaMLP:
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=12, num_attention_heads=2, num_key_value_heads=2)
    return LlamaMLP(config)


def random_moe(top_k: int, shared_rate: float = 0.5, seed: int = 0, router_std: float = 1.0, mlp: str = "llama") -> MoEFeedForward:
    """Return an MoE layer whose shared expert, routed experts and router all have different random weights."""
    torch.manual_seed(seed)
    if mlp == "llama":
        dense = llama_mlp()
    else:
        dense = GPT2MLP(4 * HIDDEN, GPT2Config(n_embd=HIDDEN, n_head=2))
    moe = MoEFeedForward(dense, HIDDEN, NUM_EXPERTS, top_k, shared_rate)
    with torch.no_grad():
        for parameter in moe.parameters():
            parameter.normal_(std=0.5)
        moe.router.weight.normal_(std=router_std)
    return moe.eval()


def random_hidden(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("top_k", [1, 2, 3, NUM_EXPERTS])
@pytest.mark.parametrize("mlp", ["llama", "gpt2"])
def test_grouped_equals_reference(top_k, mlp):
    moe = random_moe(top_k, mlp=mlp)
    hidden = random_hidden()

    grouped = moe(hidden)
    reference = moe.forward_reference(hidden)

    difference = max_difference(grouped, reference)
    assert difference < TOLERANCE, f"top-{top_k}: grouped and reference outputs differ by {difference:.3g}"


@pytest.mark.parametrize("shared_rate", [0.0, 0.3, 1.0])
def test_grouped_equals_reference_shared_rates(shared_rate):
    moe = random_moe(2, shared_rate=shared_rate)
    hidden = random_hidden()

    difference = max_difference(moe(hidden), moe.forward_reference(hidden))

    assert difference < TOLERANCE, f"shared_rate={shared_rate}: outputs differ by {difference:.3g}"


def test_grouped_with_unused_experts():
    # a router that sends every token to expert 0 leaves experts 1 to 3 without tokens under top-1
    moe = random_moe(1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0
    hidden = random_hidden().abs()  # positive hidden states give expert 0 the largest logit

    grouped = moe(hidden)
    counts = torch.bincount(moe.selected_experts.reshape(-1), minlength=NUM_EXPERTS)

    assert counts[0].item() == hidden.shape[0] * hidden.shape[1], f"expert token counts {counts.tolist()}"
    difference = max_difference(grouped, moe.forward_reference(hidden))
    assert difference < TOLERANCE, f"outputs differ by {difference:.3g} when experts 1-3 get no token"


@pytest.mark.parametrize("top_k", [1, 2, NUM_EXPERTS])
def test_grouped_gradients_equal_reference(top_k):
    moe = random_moe(top_k)
    hidden = random_hidden()
    projection = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(2))

    gradients = []
    for forward in (moe.forward, moe.forward_reference):
        moe.zero_grad(set_to_none=True)
        inputs = hidden.clone().requires_grad_(True)
        (forward(inputs) * projection).sum().backward()
        named = {name: parameter.grad.clone() for name, parameter in moe.named_parameters() if parameter.grad is not None}
        named["input"] = inputs.grad.clone()
        gradients.append(named)
    grouped, reference = gradients

    assert grouped.keys() == reference.keys(), f"gradients reach {sorted(grouped)} vs {sorted(reference)}"
    assert "router.weight" in grouped, "the router gets no gradient"
    for name in reference:
        difference = max_difference(grouped[name], reference[name])
        assert difference < 1e-5, f"top-{top_k}: gradient of {name} differs by {difference:.3g}"
    router_size = grouped["router.weight"].abs().max().item()
    assert router_size > 0, "the router's gradient is zero"


@pytest.mark.parametrize("top_k", [1, 2, NUM_EXPERTS])
def test_routing_weights_sum_to_one(top_k):
    moe = random_moe(top_k)
    hidden = random_hidden()

    moe(hidden)
    tokens = hidden.shape[0] * hidden.shape[1]
    sums = moe.routing_weights.sum(dim=-1)

    assert moe.routing_weights.shape == (tokens, top_k), f"routing weights shape {tuple(moe.routing_weights.shape)}"
    assert moe.selected_experts.shape == (tokens, top_k), f"selected experts shape {tuple(moe.selected_experts.shape)}"
    assert moe.router_logits.shape == (tokens, NUM_EXPERTS), f"router logits shape {tuple(moe.router_logits.shape)}"
    assert max_difference(sums, torch.ones(tokens)) < TOLERANCE, f"routing weights sum to {sums.tolist()}"
    assert (moe.routing_weights >= 0).all(), "a routing weight is negative"


def test_selected_experts_distinct_per_token():
    moe = random_moe(3)
    moe(random_hidden())

    distinct = [len(set(row)) for row in moe.selected_experts.tolist()]

    assert all(count == 3 for count in distinct), f"a token chose the same expert twice: {moe.selected_experts.tolist()}"


def test_forward_keeps_shape():
    moe = random_moe(2)
    for shape in [(2, 5, HIDDEN), (1, 1, HIDDEN), (7, HIDDEN)]:
        hidden = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        output = moe(hidden)
        assert output.shape == hidden.shape, f"input {tuple(hidden.shape)} gave output {tuple(output.shape)}"


def test_identical_experts_equal_dense():
    torch.manual_seed(0)
    dense = llama_mlp()
    moe = MoEFeedForward(dense, HIDDEN, NUM_EXPERTS, 2, 0.5)
    with torch.no_grad():
        moe.router.weight.normal_(std=1.0)
    hidden = random_hidden()

    # the routing weights of a token sum to one, so mixing copies of one MLP gives that MLP's output
    difference = max_difference(moe(hidden), dense(hidden))

    assert difference < TOLERANCE, f"an MoE of identical experts differs from the dense MLP by {difference:.3g}"


def test_routing_mask_flattens():
    attention_mask = torch.tensor([[1, 1, 0], [0, 1, 1]])

    mask = routing_mask(attention_mask)

    assert mask.dtype == torch.bool, f"mask dtype is {mask.dtype}"
    assert mask.tolist() == [True, True, False, False, True, True], f"mask is {mask.tolist()}"
