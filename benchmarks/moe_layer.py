"""Time one forward+backward pass of ummrm's MoE layer against transformers' Qwen2-MoE sparse block.

Both layers get the same weights. The router, the routed experts and the shared expert of the
Qwen2-MoE block are copied from the ummrm layer, which is built over a ``LlamaMLP`` as upcycling builds
it. Before timing, the script checks that both give finite outputs of the same shape and that they
route alike (see ``check_equivalence``).

Target: ummrm time / Qwen2-MoE time ≤ 1.0, against each experts implementation measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FULL_SHAPES = {"hidden": 576, "intermediate": 1536, "batch": 8, "sequence": 256}
QUICK_SHAPES = {"hidden": 64, "intermediate": 128, "batch": 2, "sequence": 64}
IMPLEMENTATIONS = ("eager", "grouped_mm")
TARGET = 1.0

DIFFERENCES = [
    "Qwen2-MoE scales the shared expert by a per-token sigmoid gate (an extra hidden→1 linear) and adds the routed "
    "sum unscaled, but ummrm mixes with a fixed shared rate, alpha * shared + (1 - alpha) * routed.",
    "Qwen2-MoE stores the experts as two 3D parameters with gate and up fused into one matmul, but each ummrm expert "
    "is a separate LlamaMLP module with its own gate, up and down matmuls.",
    "ummrm keeps the router logits, chosen experts and routing weights of every pass for the load-balancing loss, "
    "and Qwen2-MoE's block returns only its output.",
]


def parse_arguments(argv=None):
    parser = common.build_parser(__doc__.splitlines()[0], default_repeats=20, quick_repeats=5)
    parser.add_argument("--num-experts", type=int, default=4, help="routed experts K (default: 4)")
    parser.add_argument("--top-k", type=int, default=2, help="routed experts per token (default: 2)")
    parser.add_argument("--shared-rate", type=float, default=0.5, help="ummrm's shared-expert rate alpha (default: 0.5)")
    parser.add_argument("--batch", type=int, default=None, help=f"sequences per pass (default: {FULL_SHAPES['batch']}, {QUICK_SHAPES['batch']} with --quick)")
    parser.add_argument("--sequence", type=int, default=None, help=f"tokens per sequence (default: {FULL_SHAPES['sequence']}, {QUICK_SHAPES['sequence']} with --quick)")
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS),
                        help="comma-separated experts implementations of the Qwen2-MoE block to time: eager (the loop in "
                        "modeling_qwen2_moe.py) and grouped_mm (what transformers 5.25 gives a Qwen2-MoE model built "
                        "with from_config or from_pretrained) (default: both)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs (default: 0)")
    arguments = common.parse_arguments(parser, argv)
    shapes = dict(QUICK_SHAPES if arguments.quick else FULL_SHAPES)
    for key in ("batch", "sequence"):
        if getattr(arguments, key) is not None:
            shapes[key] = getattr(arguments, key)
    arguments.shapes = shapes
    arguments.implementations = [name.strip() for name in arguments.implementations.split(",") if name.strip()]
    unknown = sorted(set(arguments.implementations) - set(IMPLEMENTATIONS))
    if unknown or not arguments.implementations:
        parser.error(f"--implementations {','.join(unknown) or '(empty)'} is invalid; choose from {', '.join(IMPLEMENTATIONS)}.")
    return arguments


def build_ummrm_layer(shapes: dict, num_experts: int, top_k: int, shared_rate: float, seed: int):
    """Build ummrm's MoE layer over a LlamaMLP, with the router initialised as ``upcycle`` does and noisy experts."""
    import torch
    from torch import nn
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from ummrm.moe import MoEFeedForward
    from ummrm.upcycle import perturb_expert

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=shapes["hidden"], intermediate_size=shapes["intermediate"], hidden_act="silu")
    layer = MoEFeedForward(LlamaMLP(config), shapes["hidden"], num_experts, top_k, shared_rate)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nn.init.normal_(layer.router.weight, std=0.02, generator=generator)
    # Noise makes the experts differ, so that a token sent to the wrong expert changes the output.
    for expert in layer.experts:
        perturb_expert(expert, 0.0, 0.05, generator)
    return layer


def build_qwen2_moe_block(ours, shapes: dict, num_experts: int, top_k: int, implementation: str):
    """Build transformers' Qwen2MoeSparseMoeBlock with the weights of ummrm's layer and a zero shared-expert gate."""
    import torch
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    config = Qwen2MoeConfig(
        hidden_size=shapes["hidden"],
        moe_intermediate_size=shapes["intermediate"],
        shared_expert_intermediate_size=shapes["intermediate"],
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        hidden_act="silu",
        experts_implementation=implementation,
    )
    block = Qwen2MoeSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        for index, expert in enumerate(ours.experts):
            block.experts.gate_up_proj[index].copy_(torch.cat([expert.gate_proj.weight, expert.up_proj.weight], dim=0))
            block.experts.down_proj[index].copy_(expert.down_proj.weight)
        block.shared_expert.load_state_dict(ours.shared_expert.state_dict())
        # sigmoid(0) = 0.5, which makes the Qwen2-MoE output comparable to ummrm's with alpha = 0.5.
        block.shared_expert_gate.weight.zero_()
    return block


def check_equivalence(ours, theirs: dict, inputs) -> float:
    """Check the outputs and routing of both layers before timing, and return the largest routing-check difference.

    With a zero shared-expert gate, Qwen2-MoE computes ``0.5 * S(h) + R(h)`` and ummrm with alpha = 0.5
    computes ``0.5 * S(h) + 0.5 * R(h)``, so ``2 * ours - theirs`` must equal ``0.5 * S(h)`` when both
    send every token to the same experts with the same weights.
    """
    import torch

    largest = 0.0
    with torch.no_grad():
        output = ours(inputs)
        shared = ours.shared_expert(inputs)
        for name, block in theirs.items():
            reference = block(inputs)
            if reference.shape != output.shape:
                raise SystemExit(f"{name} output shape {tuple(reference.shape)} differs from ummrm's {tuple(output.shape)}")
            if not (torch.isfinite(output).all() and torch.isfinite(reference).all()):
                raise SystemExit(f"ummrm or {name} returned non-finite outputs, so the timing would mean nothing")
            if ours.shared_rate == 0.5:
                difference = (2 * output - reference - 0.5 * shared).abs().max().item()
                scale = reference.abs().max().item()
                if difference > 1e-4 * max(scale, 1.0):
                    raise SystemExit(f"{name} and ummrm route differently: routing-check difference {difference:.3g} (output scale {scale:.3g})")
                largest = max(largest, difference)
    return largest


def forward_backward(layer, inputs, grad_output) -> None:
    layer.zero_grad(set_to_none=True)
    inputs.grad = None
    layer(inputs).backward(grad_output)


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    import torch

    shapes = arguments.shapes
    report = common.Report("moe_layer: ummrm MoEFeedForward vs transformers Qwen2MoeSparseMoeBlock, forward+backward", arguments.quick)
    ours = build_ummrm_layer(shapes, arguments.num_experts, arguments.top_k, arguments.shared_rate, arguments.seed)
    theirs = {
        f"qwen2_moe[{name}]": build_qwen2_moe_block(ours, shapes, arguments.num_experts, arguments.top_k, name)
        for name in arguments.implementations
    }
    generator = torch.Generator().manual_seed(arguments.seed + 1)
    inputs = torch.randn(shapes["batch"], shapes["sequence"], shapes["hidden"], generator=generator)
    grad_output = torch.randn(inputs.shape, generator=generator)
    difference = check_equivalence(ours, theirs, inputs)
    inputs.requires_grad_(True)

    counts = torch.bincount(ours.selected_experts.reshape(-1), minlength=arguments.num_experts).tolist()
    report.add(
        f"shapes: hidden {shapes['hidden']}, intermediate {shapes['intermediate']} per expert and shared, "
        f"{arguments.num_experts} experts, top-{arguments.top_k}, tokens {shapes['batch']} × {shapes['sequence']}"
    )
    report.add(f"routed slots per expert: {counts}")
    if arguments.shared_rate == 0.5:
        report.add(f"check: same output shape, finite outputs, same routing (largest routing-check difference {difference:.3g})")
    else:
        report.add("check: same output shape and finite outputs (the routing check runs only with --shared-rate 0.5)")
    report.add("still differs:")
    for difference_text in DIFFERENCES:
        report.add(f"  - {difference_text}")
    report.add()

    contenders = {"ummrm": common.timed(lambda: forward_backward(ours, inputs, grad_output))}
    for name, block in theirs.items():
        contenders[name] = common.timed(lambda block=block: forward_backward(block, inputs, grad_output))
    times = common.run_alternating(contenders, arguments.repeats, arguments.warmup)
    report.add_time_table({name: parts["total"] for name, parts in times.items()}, unit_name="ms", scale=1000)
    for name in theirs:
        ratios = common.per_repeat_ratios(times["ummrm"]["total"], times[name]["total"])
        report.add_ratio(f"ummrm/{name} time", ratios, target=TARGET)
    report.append_to(arguments.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
