"""Compare scoring throughput (responses/s) of the merged, dense and unmerged MoE reward models and a 3-model ensemble.

All four score the same responses, encoded once by ummrm's ``RewardEncoder`` and scored with
``score_sequences`` (length-sorted batches). The models are built in the script from one base model:
dense = ``create_reward_model``; MoE = a copy upcycled with perturbed experts; merged = a copy of the
MoE merged with uniform weights; ensemble = three dense models with different head seeds, whose rewards
are averaged (three forward passes per response).

Targets: merged ≥ 0.98 × dense and merged ≥ 2.8 × ensemble, in responses/s.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET_MERGED_VS_DENSE = 0.98
TARGET_MERGED_VS_ENSEMBLE = 2.8
ENSEMBLE_SEEDS = (0, 1, 2)


def parse_arguments(argv=None):
    parser = common.build_parser(__doc__.splitlines()[0], default_repeats=3, quick_repeats=2)
    parser.add_argument("--model", default=common.MODEL_ALIAS, help=f"base model reference (default: {common.MODEL_ALIAS}; with --quick only its tokenizer is used)")
    parser.add_argument("--data", type=Path, default=common.HH_FILE, help=f"preference file whose chosen and rejected responses are scored (default: {common.HH_FILE})")
    parser.add_argument("--responses", type=int, default=None, help="responses to score per model and repeat (default: 1000, 64 with --quick)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per prompt+response after truncation (default: 128, 64 with --quick)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default: 16)")
    parser.add_argument("--num-experts", type=int, default=4, help="routed experts K of the MoE model (default: 4)")
    parser.add_argument("--top-k", type=int, default=2, help="routed experts per token (default: 2)")
    parser.add_argument("--layers", default="all", help="blocks to upcycle: all, last:N or indices (default: all)")
    parser.add_argument("--perturb-noise", type=float, default=0.01, help="relative Gaussian noise on the routed experts, so that they differ (default: 0.01)")
    arguments = common.parse_arguments(parser, argv)
    if arguments.responses is None:
        arguments.responses = 64 if arguments.quick else 1000
    if arguments.max_length is None:
        arguments.max_length = 64 if arguments.quick else 128
    if arguments.responses < 1:
        parser.error(f"--responses {arguments.responses} is invalid; give at least 1.")
    if not arguments.data.is_file():
        parser.error(f"--data {arguments.data} not found; give a local preference file.")
    return arguments


def build_dense(arguments, seed: int):
    """Return ``(model, tokenizer)`` in eval mode: the real reward model with its head drawn from ``seed``, or with
    --quick a tiny random one on the real tokenizer, drawn whole from ``seed``."""
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from ummrm.models import create_reward_model, load_tokenizer, resolve_model

    if not arguments.quick:
        model, tokenizer = create_reward_model(arguments.model, seed=seed)
        return model.eval(), tokenizer
    tokenizer, _ = load_tokenizer(resolve_model(arguments.model))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **common.QUICK_REWARD_CONFIG)
    return AutoModelForSequenceClassification.from_config(config, dtype=torch.float32).eval(), tokenizer


def load_responses(arguments, tokenizer) -> list[list[int]]:
    """Encode the chosen and rejected responses of the first pairs of the data file, ``--responses`` in all."""
    from ummrm.data import load_preferences
    from ummrm.rewards import RewardEncoder

    encoder = RewardEncoder(tokenizer, max_length=arguments.max_length)
    data = load_preferences(str(arguments.data), max_rows=arguments.responses + 64)
    sequences = []
    for pair in data.pairs:
        for response in (pair.chosen, pair.rejected):
            sequences.append(encoder.encode(pair.prompt_messages, pair.prompt_text, response, pair.messages_only))
        if len(sequences) >= arguments.responses:
            break
    if len(sequences) < arguments.responses:
        raise SystemExit(f"{arguments.data} gives {len(sequences)} responses, fewer than --responses {arguments.responses}. Lower --responses.")
    return sequences[: arguments.responses]


def build_models(arguments):
    """Build the four contenders and return ``({name: [models]}, tokenizer)``. Only ``ensemble`` has several models."""
    from ummrm.merge import merge_model, uniform_betas
    from ummrm.upcycle import upcycle

    dense, tokenizer = build_dense(arguments, ENSEMBLE_SEEDS[0])
    moe = copy.deepcopy(dense)
    upcycle(moe, num_experts=arguments.num_experts, top_k=arguments.top_k, shared_rate=0.5, layers=arguments.layers,
            perturb_noise=arguments.perturb_noise, seed=0)
    merged = copy.deepcopy(moe)
    merge_model(merged, uniform_betas(merged))
    # The first member is a separate copy of the dense model, so that no contender reuses another's weights.
    ensemble = [copy.deepcopy(dense)] + [build_dense(arguments, seed)[0] for seed in ENSEMBLE_SEEDS[1:]]
    models = {"merged": [merged], "dense": [dense], "moe": [moe.eval()], "ensemble": [model.eval() for model in ensemble]}
    return models, tokenizer


def make_scorer(members: list, sequences: list[list[int]], pad_token_id: int, batch_size: int, rewards_out: dict, name: str):
    from ummrm.rewards import score_sequences

    def score() -> None:
        per_member = [score_sequences(member, sequences, pad_token_id, batch_size) for member in members]
        rewards_out[name] = [sum(values) / len(values) for values in zip(*per_member)]

    return common.timed(score)


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    report = common.Report("scoring: merged vs dense vs MoE vs 3-model ensemble, responses per second", arguments.quick)
    models, tokenizer = build_models(arguments)
    sequences = load_responses(arguments, tokenizer)
    lengths = sorted(len(sequence) for sequence in sequences)

    model_name = f"tiny random Llama on the {arguments.model} tokenizer" if arguments.quick else arguments.model
    report.add(
        f"models from {model_name}: MoE = {arguments.layers} blocks upcycled, {arguments.num_experts} experts, top-{arguments.top_k}, "
        f"shared rate 0.5, perturb noise {arguments.perturb_noise}; merged = that MoE merged with uniform weights; "
        f"ensemble = {len(ENSEMBLE_SEEDS)} dense models with seeds {ENSEMBLE_SEEDS} ({'whole model' if arguments.quick else 'score head'})"
    )
    report.add(
        f"responses: {len(sequences)} from {arguments.data}, max_length {arguments.max_length} "
        f"(tokens: median {lengths[len(lengths) // 2]}, max {lengths[-1]}, total {sum(lengths)}), batch size {arguments.batch_size}"
    )

    rewards: dict[str, list[float]] = {}
    contenders = {
        name: make_scorer(members, sequences, tokenizer.pad_token_id, arguments.batch_size, rewards, name)
        for name, members in models.items()
    }
    times = common.run_alternating(contenders, arguments.repeats, arguments.warmup)
    for name, values in rewards.items():
        if not all(math.isfinite(value) for value in values):
            raise SystemExit(f"the {name} model returned non-finite rewards, so its timing would mean nothing. Check how build_models made it.")
    difference = max(abs(a - b) for a, b in zip(rewards["merged"], rewards["moe"]))
    report.add(f"check: all rewards finite; largest |merged - MoE| reward difference {difference:.3g} (merging is not exact)")
    report.add()

    throughput = {name: [len(sequences) / seconds for seconds in parts["total"]] for name, parts in times.items()}
    report.add_time_table({name: parts["total"] for name, parts in times.items()}, unit_name="seconds per pass")
    report.add_time_table(throughput, unit_name="responses/s")
    report.add_ratio("merged/dense responses per second", common.per_repeat_ratios(throughput["merged"], throughput["dense"]),
                     target=TARGET_MERGED_VS_DENSE, higher_is_better=True)
    report.add_ratio("merged/ensemble responses per second", common.per_repeat_ratios(throughput["merged"], throughput["ensemble"]),
                     target=TARGET_MERGED_VS_ENSEMBLE, higher_is_better=True)
    report.add_ratio("moe/dense responses per second", common.per_repeat_ratios(throughput["moe"], throughput["dense"]))
    report.append_to(arguments.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
