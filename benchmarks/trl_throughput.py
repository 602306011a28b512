"""Compare dense reward-model training throughput (pairs/s) of ummrm's ``train_reward_model`` with TRL's ``RewardTrainer``.

Both train a copy of the same reward model on the same pre-tokenized pairs. Both shuffle them with the
Trainer's sampler and the same seed, so the batches are the same. Batch size, learning rate, schedule,
optimizer and logging interval are the same, every parameter is trainable, and both run in fp32 on the
CPU with no checkpoints and no evaluation. ``trl_config`` turns off the TRL defaults that would make the
runs differ (gradient checkpointing and bf16). The timed part on each side is the whole call, trainer
construction plus ``train()``.

Target: ummrm pairs/s ÷ TRL pairs/s ≥ 1.0.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TARGET = 1.0


def parse_arguments(argv=None):
    parser = common.build_parser(__doc__.splitlines()[0], default_repeats=3, quick_repeats=2)
    parser.add_argument("--model", default=common.MODEL_ALIAS, help=f"base model reference (default: {common.MODEL_ALIAS}; with --quick only its tokenizer is used)")
    parser.add_argument("--data", type=Path, default=common.HH_FILE, help=f"preference file (default: {common.HH_FILE})")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (default: 8, 2 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run; a run trains on batch size × steps pairs (default: 4, 3 with --quick)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per sequence; ummrm's encoder truncates to it (default: 128, 64 with --quick)")
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="peak learning rate, linear decay (default: 1e-5)")
    parser.add_argument("--logging-steps", type=int, default=10, help="log every N steps, on both sides (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the head and the data order (default: 0)")
    arguments = common.parse_arguments(parser, argv)
    defaults = {"batch_size": (2, 8), "steps": (3, 4), "max_length": (64, 128)}
    for name, (quick, full) in defaults.items():
        if getattr(arguments, name) is None:
            setattr(arguments, name, quick if arguments.quick else full)
    if not arguments.data.is_file():
        parser.error(f"--data {arguments.data} not found; give a local preference file.")
    return arguments


def build_model(arguments):
    """Return ``(model, tokenizer)``: the real reward model, or a tiny random one on the real tokenizer with --quick."""
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from ummrm.models import create_reward_model, load_tokenizer, resolve_model

    if not arguments.quick:
        return create_reward_model(arguments.model, seed=arguments.seed)
    tokenizer, _ = load_tokenizer(resolve_model(arguments.model))
    torch.manual_seed(arguments.seed)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **common.QUICK_REWARD_CONFIG)
    return AutoModelForSequenceClassification.from_config(config, dtype=torch.float32), tokenizer


def load_pairs(arguments, tokenizer) -> list:
    """Encode the first ``batch size × steps`` usable pairs of the data file with ummrm's encoder."""
    from ummrm.data import load_preferences
    from ummrm.rewards import RewardEncoder

    needed = arguments.batch_size * arguments.steps
    encoder = RewardEncoder(tokenizer, max_length=arguments.max_length)
    data = load_preferences(str(arguments.data), max_rows=2 * needed + 64)
    pairs, _ = encoder.encode_pairs(data.pairs)
    if len(pairs) < needed:
        raise SystemExit(f"{arguments.data} gives {len(pairs)} usable pairs, but batch size × steps needs {needed}. Lower --steps or --batch-size.")
    return pairs[:needed]


def trl_config(arguments, output_dir: Path):
    """Return TRL's RewardConfig matching ummrm's ``training_arguments`` for the same settings."""
    import torch
    from trl import RewardConfig

    return RewardConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=arguments.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=arguments.learning_rate,
        num_train_epochs=1,
        weight_decay=0.0,
        warmup_steps=0,
        lr_scheduler_type="linear",
        logging_steps=arguments.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        eval_strategy="no",
        seed=arguments.seed,
        data_seed=arguments.seed,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=False,
        max_length=arguments.max_length,
        center_rewards_coefficient=None,
        # TRL 1.16 turns on gradient checkpointing and bf16 by default, but ummrm trains in fp32 without
        # checkpointing. transformers 5.25 calls the first activation_checkpointing, and gradient_checkpointing
        # is its deprecated alias.
        activation_checkpointing=False,
        bf16=False,
    )


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    from datasets import Dataset
    from trl import RewardTrainer

    from ummrm.training import TrainSettings, train_reward_model

    report = common.Report("trl_throughput: dense reward-model training, ummrm train_reward_model vs TRL RewardTrainer", arguments.quick)
    template, tokenizer = build_model(arguments)
    pairs = load_pairs(arguments, tokenizer)
    dataset = Dataset.from_list([{"chosen_ids": pair.chosen_ids, "rejected_ids": pair.rejected_ids} for pair in pairs])
    tokens = sum(len(pair.chosen_ids) + len(pair.rejected_ids) for pair in pairs)
    settings = TrainSettings(
        learning_rate=arguments.learning_rate, epochs=1.0, batch_size=arguments.batch_size, trainable_layers=-1,
        logging_steps=arguments.logging_steps, seed=arguments.seed,
    )
    model_name = f"tiny random Llama on the {arguments.model} tokenizer" if arguments.quick else arguments.model
    report.add(f"model: {model_name}, {sum(parameter.numel() for parameter in template.parameters()) / 1e6:.1f} M parameters, all trainable, fp32")
    report.add(
        f"data: first {len(pairs)} usable pairs of {arguments.data} ({tokens} tokens), truncated by ummrm's encoder to "
        f"{arguments.max_length} tokens, so TRL's max_length filter drops none"
    )
    report.add(f"run: {arguments.steps} steps × {arguments.batch_size} pairs, learning rate {arguments.learning_rate}, logging every {arguments.logging_steps} steps")
    report.add("timed on each side: trainer construction + train(); model copies are made before timing")
    applied = trl_config(arguments, Path(tempfile.gettempdir()) / "ummrm-trl-config-check")
    report.add(
        f"TRL settings that differ from its defaults: activation (gradient) checkpointing {applied.activation_checkpointing}, "
        f"bf16 {applied.bf16}"
    )

    losses: dict[str, list[float]] = {"ummrm": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="ummrm-trl-throughput-") as scratch:
        run_index = {"ummrm": 0, "trl": 0}

        def run_ummrm() -> float:
            run_index["ummrm"] += 1
            model = copy.deepcopy(template)
            start = time.perf_counter()
            summary = train_reward_model(model, tokenizer.pad_token_id, pairs, Path(scratch) / f"ummrm-{run_index['ummrm']}", settings, save_checkpoints=False)
            seconds = time.perf_counter() - start
            losses["ummrm"].append(summary["train_loss"])
            return seconds

        def run_trl() -> float:
            run_index["trl"] += 1
            model = copy.deepcopy(template)
            config = trl_config(arguments, Path(scratch) / f"trl-{run_index['trl']}")
            start = time.perf_counter()
            trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
            result = trainer.train()
            seconds = time.perf_counter() - start
            losses["trl"].append(result.training_loss)
            return seconds

        # Both Trainers print their logs to stdout. Sending them to stderr leaves only the report on stdout.
        with contextlib.redirect_stdout(sys.stderr):
            times = common.run_alternating({"ummrm": run_ummrm, "trl": run_trl}, arguments.repeats, arguments.warmup)

    report.add(
        f"mean training loss of the last run: ummrm {losses['ummrm'][-1]:.5f}, TRL {losses['trl'][-1]:.5f} "
        "(close values show that both trained on the same batches and read the reward at the same token)"
    )
    report.add()
    report.add_time_table({name: parts["total"] for name, parts in times.items()}, unit_name="seconds per run")
    throughput = {name: [len(pairs) / seconds for seconds in parts["total"]] for name, parts in times.items()}
    report.add_time_table(throughput, unit_name="pairs/s")
    report.add_ratio("ummrm/trl pairs per second", common.per_repeat_ratios(throughput["ummrm"], throughput["trl"]), target=TARGET, higher_is_better=True)
    report.append_to(arguments.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
