"""Time one training step of the upcycled MoE reward model against the dense reward model it came from.

A step is what ``ummrm.training``'s Trainer does per batch: its ``compute_loss`` (Bradley-Terry loss,
plus the load-balancing loss for the MoE model, and the metrics it records), ``backward``, gradient
clipping to ``max_grad_norm`` and the optimizer that ``Trainer.create_optimizer`` builds (in transformers
5.25, AdamW, fused on torch >= 2.8). All parameters are trainable and both models see the same batch.

The MoE model does more arithmetic per token, so its time is compared with the analytic FLOPs ratio
(``flops_per_token``): target (time ratio) / (FLOPs ratio) ≤ 1.15.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET = 1.15
STEP_PARTS = {
    "total": "the whole step",
    "forward": "the Trainer's compute_loss, forward pass included",
    "backward": "loss.backward()",
    "optimizer": "gradient clipping, optimizer step and zero_grad",
}
# A LlamaConfig small enough for seconds of runtime, for --quick.
QUICK_CONFIG = dict(
    vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, num_labels=1,
)


def parse_arguments(argv=None):
    parser = common.build_parser(__doc__.splitlines()[0], default_repeats=5, quick_repeats=3)
    parser.add_argument("--pairs", type=int, default=None, help="preference pairs per step (default: 4, 2 with --quick)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default: 128, 32 with --quick)")
    parser.add_argument("--num-experts", type=int, default=4, help="routed experts K (default: 4)")
    parser.add_argument("--top-k", type=int, default=2, help="routed experts per token (default: 2)")
    parser.add_argument("--shared-rate", type=float, default=0.5, help="shared-expert rate alpha (default: 0.5)")
    parser.add_argument("--layers", default="all", help="blocks to upcycle: all, last:N or indices (default: all)")
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="AdamW learning rate (default: 1e-5)")
    parser.add_argument("--router-aux-loss-coef", type=float, default=0.01, help="weight of the MoE load-balancing loss (default: 0.01)")
    parser.add_argument("--model", default=common.MODEL_ALIAS, help=f"base model reference (default: {common.MODEL_ALIAS}; ignored with --quick)")
    parser.add_argument("--data", type=Path, default=None,
                        help="preference file whose first pairs make the batch, truncated to --max-length; "
                        "default: random token ids of exactly --max-length tokens (not with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the head, router and random token ids (default: 0)")
    arguments = common.parse_arguments(parser, argv)
    if arguments.pairs is None:
        arguments.pairs = 2 if arguments.quick else 4
    if arguments.max_length is None:
        arguments.max_length = 32 if arguments.quick else 128
    if arguments.quick and arguments.data is not None:
        parser.error("--data needs the real model's tokenizer; leave out --quick to use it.")
    return arguments


def build_dense_model(arguments):
    """Return ``(model, tokenizer)``: the real reward model, or a tiny random one (tokenizer None) with --quick."""
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from ummrm.models import create_reward_model

    if arguments.quick:
        torch.manual_seed(arguments.seed)
        return AutoModelForSequenceClassification.from_config(LlamaConfig(**QUICK_CONFIG), dtype=torch.float32), None
    return create_reward_model(arguments.model, seed=arguments.seed)


def build_batch(arguments, model, tokenizer) -> dict:
    """Return ``{input_ids, attention_mask}`` with the chosen rows first, as ``PairCollator`` makes them."""
    import torch

    from ummrm.data import load_preferences
    from ummrm.rewards import RewardEncoder
    from ummrm.training import PairCollator

    if arguments.data is None:
        generator = torch.Generator().manual_seed(arguments.seed)
        vocab = model.config.vocab_size
        input_ids = torch.randint(1, vocab, (2 * arguments.pairs, arguments.max_length), generator=generator)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    encoder = RewardEncoder(tokenizer, max_length=arguments.max_length)
    data = load_preferences(str(arguments.data), max_rows=4 * arguments.pairs + 64)
    pairs, _ = encoder.encode_pairs(data.pairs)
    if len(pairs) < arguments.pairs:
        raise SystemExit(f"{arguments.data} gives {len(pairs)} usable pairs, fewer than --pairs {arguments.pairs}. Lower --pairs.")
    collator = PairCollator(tokenizer.pad_token_id)
    return collator([{"chosen_ids": pair.chosen_ids, "rejected_ids": pair.rejected_ids} for pair in pairs[: arguments.pairs]])


def flops_per_token(config, sequence_length: int, num_experts: int | None = None, top_k: int | None = None, moe_layers: int = 0) -> float:
    """Estimate the forward matmul FLOPs per token of a Llama-style decoder (2 FLOPs per multiply-add).

    Per block: the q, k, v and o projections, the attention scores and weighted sum over the whole
    sequence (a causal kernel may skip up to half of those), and the MLP's three hidden × intermediate
    matmuls. An MoE block runs the shared expert, ``top_k`` routed experts and a hidden × K router.
    Embedding lookups, norms, activations and the one-output score head are left out: they are the same
    for both models and small. Backward costs about twice the forward for both, so the ratio of
    training FLOPs equals the ratio of forward FLOPs.
    """
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    projections = 2 * hidden * (heads * head_dim + 2 * kv_heads * head_dim) + 2 * heads * head_dim * hidden
    attention = 2 * 2 * heads * head_dim * sequence_length
    dense_mlp = 2 * 3 * hidden * config.intermediate_size
    blocks = config.num_hidden_layers
    total = blocks * (projections + attention + dense_mlp)
    if moe_layers:
        moe_mlp = (1 + top_k) * dense_mlp + 2 * hidden * num_experts
        total += moe_layers * (moe_mlp - dense_mlp)
    return float(total)


def build_trainer(model, settings, output_dir: Path):
    """Return the ummrm Trainer for ``model`` and the optimizer it would train with."""
    from ummrm.training import PairDataset, _trainer_class, freeze_lower_layers, training_arguments

    freeze_lower_layers(model, -1)
    arguments = training_arguments(output_dir, settings, save_checkpoints=False)
    trainer = _trainer_class()(model=model, args=arguments, train_dataset=PairDataset([]), settings=settings)
    optimizer = trainer.create_optimizer()
    return trainer, optimizer


def make_step(trainer, optimizer, model, batch):
    """Return a contender that runs one training step and times its parts."""
    import torch

    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]

    def step() -> dict[str, float]:
        model.train()
        start = time.perf_counter()
        loss = trainer.compute_loss(model, batch)
        forward_done = time.perf_counter()
        loss.backward()
        backward_done = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(parameters, trainer.args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        if not torch.isfinite(loss):
            raise SystemExit(f"the training loss became {loss.item()}, so the step timings would mean nothing. Lower --learning-rate.")
        return {"total": end - start, "forward": forward_done - start, "backward": backward_done - forward_done, "optimizer": end - backward_done}

    return step


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    from ummrm.training import TrainSettings
    from ummrm.upcycle import upcycle

    model_name = "tiny random Llama" if arguments.quick else arguments.model
    report = common.Report("train_step: MoE vs dense reward-model training step", arguments.quick)
    dense, tokenizer = build_dense_model(arguments)
    moe = copy.deepcopy(dense)
    moe_settings = upcycle(moe, num_experts=arguments.num_experts, top_k=arguments.top_k, shared_rate=arguments.shared_rate, layers=arguments.layers, seed=arguments.seed)
    batch = build_batch(arguments, dense, tokenizer)

    tokens = int(batch["attention_mask"].sum())
    sequence_length = batch["input_ids"].shape[1]
    config = dense.config
    dense_flops = flops_per_token(config, sequence_length)
    moe_flops = flops_per_token(config, sequence_length, arguments.num_experts, arguments.top_k, len(moe_settings.layers))
    flops_ratio = moe_flops / dense_flops
    parameters = {name: sum(parameter.numel() for parameter in model.parameters()) for name, model in (("dense", dense), ("moe", moe))}

    report.add(
        f"model: {model_name}, {config.num_hidden_layers} blocks, hidden {config.hidden_size}, intermediate {config.intermediate_size}. "
        f"MoE: {len(moe_settings.layers)} blocks upcycled, {arguments.num_experts} experts, top-{arguments.top_k}, shared rate {arguments.shared_rate}"
    )
    source = "random token ids" if arguments.data is None else f"the first pairs of {arguments.data}"
    report.add(f"batch: {arguments.pairs} pairs = {2 * arguments.pairs} sequences × {sequence_length} tokens ({tokens} real tokens), {source}")
    report.add(f"parameters (all trainable): dense {parameters['dense'] / 1e6:.1f} M, MoE {parameters['moe'] / 1e6:.1f} M")
    report.add(
        f"analytic forward FLOPs per token: dense {dense_flops / 1e6:.2f} M, MoE {moe_flops / 1e6:.2f} M, "
        f"FLOPs ratio MoE/dense {flops_ratio:.3f}"
    )
    report.add(
        "the FLOPs model counts matmuls per token only. The optimizer step and gradient clipping scale with the "
        "parameter count instead, so their share is shown separately below."
    )

    with tempfile.TemporaryDirectory(prefix="ummrm-train-step-") as scratch:
        dense_settings = TrainSettings(learning_rate=arguments.learning_rate, batch_size=arguments.pairs, seed=arguments.seed)
        moe_train_settings = TrainSettings(
            learning_rate=arguments.learning_rate, batch_size=arguments.pairs, seed=arguments.seed,
            router_aux_loss_coef=arguments.router_aux_loss_coef,
        )
        dense_trainer, dense_optimizer = build_trainer(dense, dense_settings, Path(scratch) / "dense")
        moe_trainer, moe_optimizer = build_trainer(moe, moe_train_settings, Path(scratch) / "moe")
        fused = "fused" if dense_optimizer.defaults.get("fused") else "not fused"
        report.add(f"optimizer: {type(dense_optimizer).__name__} ({fused}), gradient clipping to norm {dense_trainer.args.max_grad_norm}")
        report.add()
        contenders = {
            "dense": make_step(dense_trainer, dense_optimizer, dense, batch),
            "moe": make_step(moe_trainer, moe_optimizer, moe, batch),
        }
        times = common.run_alternating(contenders, arguments.repeats, arguments.warmup)

    for part, description in STEP_PARTS.items():
        report.add(f"{part}: {description}")
        report.add_time_table({name: parts[part] for name, parts in times.items()}, unit_name="seconds")

    time_ratios = common.per_repeat_ratios(times["moe"]["total"], times["dense"]["total"])
    report.add_ratio("moe/dense step time", time_ratios)
    report.add(f"ratio moe/dense FLOPs (analytic): {flops_ratio:.3f}")
    report.add_ratio("(moe/dense step time) / (FLOPs ratio)", [ratio / flops_ratio for ratio in time_ratios], target=TARGET)
    forward_backward = [
        (moe_parts["forward"] + moe_parts["backward"]) / (dense_parts["forward"] + dense_parts["backward"])
        for moe_parts, dense_parts in zip(_rows(times["moe"]), _rows(times["dense"]))
    ]
    report.add_ratio("(moe/dense forward+backward time) / (FLOPs ratio), without the optimizer", [ratio / flops_ratio for ratio in forward_backward])
    report.append_to(arguments.results)
    return 0


def _rows(parts: dict[str, list[float]]) -> list[dict[str, float]]:
    """Turn ``{part: [value per repeat]}`` into one ``{part: value}`` per repeat."""
    return [dict(zip(parts, values)) for values in zip(*parts.values())]


if __name__ == "__main__":
    raise SystemExit(main())
