"""Losses of reward-model training, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ummrm.losses import bradley_terry_loss, centering_loss, expert_slot_fractions, load_balancing_loss

TOLERANCE = 1e-6


def balanced_top1(num_experts: int = 4, rounds: int = 2):
    """Return uniform logits and a top-1 selection that gives every expert the same number of tokens."""
    tokens = num_experts * rounds
    logits = torch.zeros(tokens, num_experts)
    selected = torch.arange(tokens).remainder(num_experts)[:, None]  # experts 0, 1, 2, 3, 0, 1, ...
    return logits, selected, torch.ones(tokens, dtype=torch.bool)


# ---------------------------------------------------------------- Bradley-Terry and centring


def test_bradley_terry_by_hand():
    chosen = [1.0, 0.5, -2.0, 3.0]
    rejected = [0.0, 1.5, -2.5, 3.0]

    # -log sigmoid(m) = log(1 + exp(-m)) for the margins m = 1, -1, 0.5, 0
    expected = sum(math.log1p(math.exp(-(c - r))) for c, r in zip(chosen, rejected)) / len(chosen)
    loss = bradley_terry_loss(torch.tensor(chosen), torch.tensor(rejected)).item()

    assert abs(loss - expected) < TOLERANCE, f"loss {loss} != {expected} (difference {abs(loss - expected):.3g})"


def test_bradley_terry_tie_is_log2():
    loss = bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item()

    assert abs(loss - math.log(2.0)) < TOLERANCE, f"a zero margin gives {loss}, expected log 2 = {math.log(2.0)}"


def test_bradley_terry_large_margins_finite():
    # exp(200) overflows fp32, but the stable form gives the margin's size, 200
    loss = bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0])).item()
    assert math.isfinite(loss), f"loss is {loss} for a margin of -200"
    assert abs(loss - 200.0) < 1e-4, f"loss {loss} != 200 for a margin of -200"

    # a margin of +200 gives log(1 + exp(-200)), which is 0 in fp32
    loss = bradley_terry_loss(torch.tensor([100.0]), torch.tensor([-100.0])).item()
    assert 0.0 <= loss < 1e-30, f"loss {loss} != 0 for a margin of +200"


def test_centering_by_hand():
    chosen = torch.tensor([1.0, 0.5, -2.0])
    rejected = torch.tensor([0.0, 1.5, -2.5])

    # (1 + 0)^2 + (0.5 + 1.5)^2 + (-2 - 2.5)^2 = 1 + 4 + 20.25 = 25.25, over 3 pairs
    expected = 25.25 / 3
    loss = centering_loss(chosen, rejected).item()

    assert abs(loss - expected) < TOLERANCE, f"centering loss {loss} != {expected}"


def test_split_batch_mean_equals_full():
    generator = torch.Generator().manual_seed(0)
    chosen = torch.randn(8, generator=generator)
    rejected = torch.randn(8, generator=generator)

    for loss_function in (bradley_terry_loss, centering_loss):
        full = loss_function(chosen, rejected)
        halves = (loss_function(chosen[:4], rejected[:4]) + loss_function(chosen[4:], rejected[4:])) / 2
        difference = (full - halves).abs().item()
        assert difference < TOLERANCE, f"{loss_function.__name__}: full batch {full.item()} != mean of halves {halves.item()}"


# ---------------------------------------------------------------- load balancing


def test_load_balancing_balanced_top1():
    logits, selected, mask = balanced_top1()

    # F_i = P_i = 1/4 for every expert, so K * sum_i F_i P_i = 4 * 4 * (1/16) = 1
    loss = load_balancing_loss(logits, selected, mask).item()

    assert abs(loss - 1.0) < TOLERANCE, f"balanced top-1 routing gives {loss}, expected 1.0"


def test_load_balancing_balanced_top2():
    logits = torch.zeros(4, 4)
    # every expert appears in exactly two of the eight slots, so F_i = 2/8 = 1/4
    selected = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    mask = torch.ones(4, dtype=torch.bool)

    loss = load_balancing_loss(logits, selected, mask).item()

    assert abs(loss - 1.0) < TOLERANCE, f"balanced top-2 routing gives {loss}, expected 1.0"


def test_load_balancing_collapse_near_k():
    num_experts = 4
    logits = torch.zeros(6, num_experts)
    logits[:, 2] = 20.0  # P_2 = e^20 / (e^20 + 3), 1 to within 1e-8
    selected = torch.full((6, 1), 2)
    mask = torch.ones(6, dtype=torch.bool)

    # F = (0, 0, 1, 0) and P_2 ~ 1, so the loss is K * 1 * 1
    loss = load_balancing_loss(logits, selected, mask).item()

    assert loss > num_experts - 0.01, f"collapsed routing gives {loss}, expected about {num_experts}"
    assert loss <= num_experts + TOLERANCE, f"collapsed routing gives {loss}, above the maximum {num_experts}"


def test_load_balancing_ignores_padding():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=generator)
    selected = torch.topk(logits, 2, dim=-1).indices
    mask = torch.ones(6, dtype=torch.bool)

    # padding tokens with arbitrary logits, all routed to expert 0
    padded_logits = torch.cat([logits, 5 * torch.randn(5, 4, generator=generator)])
    padded_selected = torch.cat([selected, torch.tensor([[0, 1]] * 5)])
    padded_mask = torch.cat([mask, torch.zeros(5, dtype=torch.bool)])

    loss = load_balancing_loss(logits, selected, mask)
    padded_loss = load_balancing_loss(padded_logits, padded_selected, padded_mask)

    difference = (loss - padded_loss).abs().item()
    assert difference < 1e-7, f"padding changed the loss from {loss.item()} to {padded_loss.item()}"


def test_load_balancing_gradient_reaches_logits():
    logits, selected, mask = balanced_top1()
    logits = (logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))).requires_grad_(True)

    load_balancing_loss(logits, selected, mask).backward()

    assert logits.grad is not None, "the loss has no gradient with respect to the router logits"
    assert logits.grad.abs().max().item() > 0, "the gradient on the router logits is zero"


def test_slot_fractions_sum_to_one():
    generator = torch.Generator().manual_seed(0)
    num_experts = 5
    logits = torch.randn(12, num_experts, generator=generator)
    mask = torch.tensor([1] * 9 + [0] * 3, dtype=torch.bool)

    for top_k in range(1, num_experts + 1):
        selected = torch.topk(logits, top_k, dim=-1).indices
        fractions = expert_slot_fractions(selected, mask, num_experts)
        total = fractions.sum().item()
        assert fractions.shape == (num_experts,), f"top-{top_k}: fractions have shape {tuple(fractions.shape)}"
        assert abs(total - 1.0) < TOLERANCE, f"top-{top_k}: fractions sum to {total}"


def test_slot_fractions_by_hand():
    selected = torch.tensor([[0, 1], [0, 2], [3, 0], [1, 1]])
    mask = torch.tensor([True, True, True, False])  # the last token is padding and does not count

    # expert 0 takes 3 of the 6 real slots, experts 1, 2 and 3 one each
    expected = torch.tensor([3 / 6, 1 / 6, 1 / 6, 1 / 6])
    fractions = expert_slot_fractions(selected, mask, 4)

    difference = (fractions - expected).abs().max().item()
    assert difference < TOLERANCE, f"fractions {fractions.tolist()} != {expected.tolist()}"
