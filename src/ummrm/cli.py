"""The ``ummrm`` command: a thin layer over the library, one subcommand per stage of UMM-RM."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from ummrm.config import (
    SECTIONS,
    DataConfig,
    DenseConfig,
    EvaluateConfig,
    MergeConfig,
    MoEConfig,
    UpcycleConfig,
    add_section_arguments,
    apply_section_arguments,
    convert_value,
    load_pipeline_config,
)
from ummrm.errors import UmmrmError

logger = logging.getLogger("ummrm")

SPLITS = ("train", "eval", "calibration")


def _add_data_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    add_section_arguments(parser, DataConfig, prefix)
    # --data is the short form of the data source everywhere
    parser.add_argument("--data", dest=f"{prefix}__source" if prefix else "source", default=None, help="same as --data.source" if prefix else argparse.SUPPRESS)


def _data_config(arguments) -> DataConfig:
    return apply_section_arguments(DataConfig(), arguments)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ummrm", description="Upcycle-and-Merge MoE reward models (UMM-RM): train, upcycle, merge, evaluate and score reward models.")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging verbosity (default: INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    command = commands.add_parser("train-dense", help="train a dense Bradley-Terry reward model")
    command.add_argument("--model", required=True, help="base model: Hub id, local folder, .gguf file or smollm2-135m-instruct")
    command.add_argument("--output", required=True, help="folder to write the reward model to")
    _add_data_arguments(command)
    add_section_arguments(command, DenseConfig, "")

    command = commands.add_parser("upcycle", help="turn a dense reward model's MLPs into mixture-of-experts layers")
    command.add_argument("--model", required=True, help="dense reward model folder")
    command.add_argument("--output", required=True, help="folder to write the upcycled model to")
    _add_data_arguments(command)
    add_section_arguments(command, UpcycleConfig, "")

    command = commands.add_parser("train-moe", help="train an upcycled reward model with the load-balancing loss")
    command.add_argument("--model", required=True, help="upcycled model folder (from `ummrm upcycle`)")
    command.add_argument("--output", required=True, help="folder to write the trained MoE reward model to")
    _add_data_arguments(command)
    add_section_arguments(command, MoEConfig, "")

    command = commands.add_parser("merge", help="merge an MoE reward model back into one dense model")
    command.add_argument("--model", required=True, help="MoE reward model folder")
    command.add_argument("--output", required=True, help="folder to write the merged dense model to")
    _add_data_arguments(command)
    add_section_arguments(command, MergeConfig, "")

    command = commands.add_parser("evaluate", help="pairwise accuracy of a reward model on held-out pairs")
    command.add_argument("--model", required=True, help="reward model folder (dense, MoE or merged)")
    command.add_argument("--split", default="eval", choices=SPLITS, help="which split of the data to evaluate on (default: eval)")
    command.add_argument("--output", default=None, help="JSON file to write the result to (default: print only)")
    _add_data_arguments(command)
    add_section_arguments(command, EvaluateConfig, "")

    command = commands.add_parser("score", help="rewards for prompt/response rows, written as JSON lines")
    command.add_argument("--model", required=True, help="reward model folder (dense, MoE or merged)")
    command.add_argument("--input", required=True, help="rows with `prompt` (text or message list) and `response`: .jsonl, .json, .csv or .parquet, gzipped or not")
    command.add_argument("--output", required=True, help="JSON lines file to write, one {prompt, response, reward} per row")
    command.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default: 16)")
    command.add_argument("--max-length", type=int, default=512, help="tokens per prompt+response (default: 512)")
    command.add_argument("--text-format", default="auto", choices=("auto", "chat", "plain"), help="how text is built (default: auto)")

    from ummrm.serving import TOKEN_ENVIRONMENT_VARIABLE, ServeSettings

    serve_defaults = ServeSettings()
    command = commands.add_parser("serve", help="serve rewards over HTTP (POST /get_reward for OpenRLHF's --remote_rm_url, POST /score)")
    command.add_argument("--model", required=True, help="reward model folder (dense, MoE or merged)")
    command.add_argument("--host", default=serve_defaults.host, help=f"address to listen on; any address but a loopback one needs a bearer token (default: {serve_defaults.host})")
    command.add_argument("--port", type=int, default=serve_defaults.port, help=f"TCP port; 0 picks a free one (default: {serve_defaults.port})")
    command.add_argument("--token-file", default=None, help=f"file holding the bearer token that clients must send as `Authorization: Bearer <token>` (default: ${TOKEN_ENVIRONMENT_VARIABLE}, else no token)")
    command.add_argument("--max-items", type=int, default=serve_defaults.max_items, help=f"texts or rows per request (default: {serve_defaults.max_items})")
    command.add_argument("--max-body-bytes", type=int, default=serve_defaults.max_body_bytes, help=f"bytes per request body (default: {serve_defaults.max_body_bytes})")
    command.add_argument("--max-tokens", type=int, default=serve_defaults.max_tokens, help=f"tokens per text before truncation to --max-length; a longer text is rejected (default: {serve_defaults.max_tokens})")
    command.add_argument("--batch-size", type=int, default=serve_defaults.batch_size, help=f"sequences per forward pass (default: {serve_defaults.batch_size})")
    command.add_argument("--max-wait-ms", type=float, default=serve_defaults.max_wait_ms, help=f"milliseconds the model waits for other requests to fill a batch (default: {serve_defaults.max_wait_ms:g})")
    command.add_argument("--max-length", type=int, default=serve_defaults.max_length, help=f"tokens per text after truncation, as for `ummrm score` (default: {serve_defaults.max_length})")
    command.add_argument("--text-format", default=serve_defaults.text_format, choices=("auto", "chat", "plain"), help="how /score builds text from a prompt and response; /get_reward always reads plain text (default: auto)")

    command = commands.add_parser("pipeline", help="run train-dense, upcycle, train-moe, merge and evaluate into one folder")
    command.add_argument("--config", default=None, help="YAML config (see configs/); flags below override it")
    command.add_argument("--model", default=None, help="base model (overrides the config's `model`)")
    command.add_argument("--output-dir", "--output", dest="output_dir", default=None, help="output folder (overrides the config's `output_dir`)")
    command.add_argument("--until", default="merged", choices=("dense", "moe", "merged"), help="last stage to run; the models made up to it are evaluated (default: merged)")
    for name, cls in SECTIONS.items():
        if name == "data":
            _add_data_arguments(command, "data")
        else:
            add_section_arguments(command, cls, name)

    from ummrm.overopt import SECTIONS as OVEROPT_SECTIONS

    command = commands.add_parser("overopt", help="measure reward over-optimisation: gold model, proxies of every kind, Best-of-N, report")
    command.add_argument("--config", default=None, help="YAML config (see configs/overopt-*.yaml); flags below override it")
    command.add_argument("--model", default=None, help="base model of the proxies (overrides the config's `model`)")
    command.add_argument("--output-dir", "--output", dest="output_dir", default=None, help="output folder (overrides the config's `output_dir`)")
    command.add_argument("--dry-run", action="store_true", help="check the config and every reference, print the planned work, and run nothing")
    for name, cls in OVEROPT_SECTIONS.items():
        add_section_arguments(command, cls, name)

    from ummrm.rl import add_rl_arguments

    command = commands.add_parser("rl", help="optimise a policy against a proxy reward model (RLOO with a KL penalty), logging the gold score and the KL")
    add_rl_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=arguments.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return COMMANDS[arguments.command](arguments)
    except UmmrmError as error:
        print(f"ummrm {arguments.command}: error: {error}", file=sys.stderr)
        return 2


def run_train_dense(arguments) -> int:
    from ummrm.pipeline import prepare_data, train_dense

    data_config = _data_config(arguments)
    config = apply_section_arguments(DenseConfig(), arguments)
    prepared = prepare_data(data_config)
    summary = train_dense(arguments.model, prepared, data_config, config, Path(arguments.output))
    print(json.dumps({"output": arguments.output, **_short(summary)}, indent=2))
    return 0


def run_upcycle(arguments) -> int:
    from ummrm.pipeline import prepare_data, save_stage, stage_settings, upcycle_model

    data_config = _data_config(arguments)
    config = apply_section_arguments(UpcycleConfig(), arguments)
    prepared = prepare_data(data_config)
    model, tokenizer, settings, check = upcycle_model(Path(arguments.model), config, prepared.splits["train"], data_config)
    save_stage(model, tokenizer, Path(arguments.output), {
        "stage": "upcycled", "settings": stage_settings(arguments.model, data_config, upcycle=config),
        "moe": settings.to_dict(), "upcycle_check": check,
    })
    print(f"upcycled blocks {settings.layers} into {settings.num_experts} experts (top-{settings.num_experts_per_tok}, shared rate {settings.shared_rate})")
    print(f"largest reward difference from the dense model on {check['sequences']} sequences: {check['max_reward_difference']:.3g}")
    return 0


def run_train_moe(arguments) -> int:
    from ummrm.models import load_reward_model
    from ummrm.pipeline import prepare_data, stage_settings, train_moe_model

    data_config = _data_config(arguments)
    config = apply_section_arguments(MoEConfig(), arguments)
    prepared = prepare_data(data_config)
    model, tokenizer = load_reward_model(arguments.model)
    metadata = {"stage": "moe", "settings": stage_settings(arguments.model, data_config, moe=config)}
    summary = train_moe_model(model, tokenizer, prepared, data_config, config, Path(arguments.output), metadata)
    print(json.dumps({"output": arguments.output, **_short(summary)}, indent=2))
    return 0


def run_merge(arguments) -> int:
    from ummrm.pipeline import merge, prepare_data, stage_settings

    data_config = _data_config(arguments)
    config = apply_section_arguments(MergeConfig(), arguments)
    prepared = prepare_data(data_config)
    record = merge(Path(arguments.model), prepared, data_config, config, Path(arguments.output), stage_settings(arguments.model, data_config, merge=config))
    print(json.dumps({"output": arguments.output, "method": record["method"], "betas": record["betas"]}, indent=2))
    return 0


def run_evaluate(arguments) -> int:
    from ummrm.pipeline import evaluate_folder, prepare_data

    data_config = _data_config(arguments)
    config = apply_section_arguments(EvaluateConfig(), arguments)
    prepared = prepare_data(data_config)
    result = evaluate_folder(Path(arguments.model), prepared, data_config, config, arguments.split)
    text = json.dumps({"model": arguments.model, "split": arguments.split, **result}, indent=2)
    if arguments.output:
        Path(arguments.output).write_text(text + "\n")
    print(text)
    return 0


def run_score(arguments) -> int:
    from ummrm.scoring import score_file

    count = score_file(arguments.model, arguments.input, arguments.output, arguments.batch_size, arguments.max_length, arguments.text_format)
    print(f"wrote {count} rewards to {arguments.output}")
    return 0


def run_serve(arguments) -> int:
    from ummrm.serving import ServeSettings, read_token, serve

    settings = ServeSettings(
        host=arguments.host, port=arguments.port, token=read_token(arguments.token_file), max_items=arguments.max_items,
        max_body_bytes=arguments.max_body_bytes, max_tokens=arguments.max_tokens, batch_size=arguments.batch_size,
        max_wait_ms=arguments.max_wait_ms, max_length=arguments.max_length, text_format=arguments.text_format,
    )
    serve(arguments.model, settings)
    return 0


def run_overopt_command(arguments) -> int:
    from ummrm.overopt import GENERATED_DATA_SOURCE, SECTIONS as OVEROPT_SECTIONS, load_overopt_config, plan_overopt, run_overopt

    config = load_overopt_config(arguments.config)
    if arguments.model is not None:
        config.model = convert_value(arguments.model, str, "--model")
    if arguments.output_dir is not None:
        config.output_dir = convert_value(arguments.output_dir, str, "--output-dir")
    if getattr(arguments, "data__source", None) is not None:
        raise UmmrmError(f"--data.source cannot be set: the proxies learn from the preferences the run writes to {GENERATED_DATA_SOURCE}.")
    for name in OVEROPT_SECTIONS:
        apply_section_arguments(getattr(config, name), arguments, name)
    if arguments.dry_run:
        print("\n".join(plan_overopt(config)))
        print("dry run: the config is valid; nothing was run")
        return 0
    record = run_overopt(config)
    from ummrm.report import markdown_table

    print(markdown_table(record["summary"], [("method", "method"), ("gold N=1", "gold_n1"), ("gold at largest N", "gold_at_largest_n"),
                                     ("peak gold", "peak_gold"), ("peak N", "peak_n")]))
    print(f"report: {Path(config.output_dir) / 'report.md'}")
    return 0


def run_rl(arguments) -> int:
    from ummrm import rl

    if arguments.plot_only is not None:
        print(f"plot: {rl.plot_runs(arguments.plot_only, arguments.plot_output)}")
        return 0
    record = rl.run_rl(rl.config_from_arguments(arguments))
    if record.get("status") == "complete":
        # secondary processes of a distributed launch return the record of a run still going
        print(json.dumps({key: record.get(key) for key in ("steps", "seconds", "seconds_per_step", "last_row", "eval_first", "eval_last", "eval_peak_gold") if key in record}, indent=2))
        print(f"outputs in {record['config']['output_dir']}")
    return 0


def run_pipeline_command(arguments) -> int:
    from ummrm.pipeline import accuracy_table, run_pipeline

    config = load_pipeline_config(arguments.config)
    if arguments.model is not None:
        config.model = convert_value(arguments.model, str, "--model")
    if arguments.output_dir is not None:
        config.output_dir = convert_value(arguments.output_dir, str, "--output-dir")
    for name in SECTIONS:
        apply_section_arguments(getattr(config, name), arguments, name)
    metrics = run_pipeline(config, until=arguments.until)
    if "accuracy" not in metrics:
        # a secondary process of a distributed launch: the first process prints the results
        return 0
    print()
    first = next(iter(metrics["accuracy"].values()))
    print(f"held-out accuracy ({metrics['data']['source']}, {first['pairs']} pairs):")
    print(accuracy_table(metrics))
    seconds = {name: record.get("seconds") for name, record in metrics["stages"].items()}
    print("stage seconds: " + ", ".join(f"{name} {value}" for name, value in seconds.items()))
    print(f"outputs in {config.output_dir}; metrics in {Path(config.output_dir) / 'metrics.json'}")
    return 0


def _short(summary: dict) -> dict:
    return {key: value for key, value in summary.items() if key != "final_log"}


COMMANDS = {
    "train-dense": run_train_dense,
    "upcycle": run_upcycle,
    "train-moe": run_train_moe,
    "merge": run_merge,
    "evaluate": run_evaluate,
    "score": run_score,
    "serve": run_serve,
    "pipeline": run_pipeline_command,
    "overopt": run_overopt_command,
    "rl": run_rl,
}


if __name__ == "__main__":
    raise SystemExit(main())
