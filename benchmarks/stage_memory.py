"""Report the peak resident memory and seconds of each pipeline stage.

The pipeline records ``stages.<name>.peak_rss_mib`` and ``seconds`` in ``metrics.json`` for data, dense,
moe, merged and each evaluate_* stage. Its peak is the largest RSS sampled every 0.1 s during the stage,
so a shorter spike can be missed. All stages run in one process, so a stage's RSS can include memory
that earlier stages left allocated.

Either read a finished run (``--run DIR``), or run ``ummrm pipeline`` first (``--config``, ``--data``,
``--output-dir``). ``--time-v`` wraps that run in ``/usr/bin/time -v`` to add the process-wide maximum RSS.
``--quick`` runs the smoke preset on a tiny random model with few pairs, into a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TIME_BINARY = "/usr/bin/time"
# Pipeline flags of --quick, which cut the smoke preset down to seconds on a tiny model.
QUICK_OVERRIDES = [
    "--data.max-rows", "160", "--data.max-train-pairs", "16", "--data.max-eval-pairs", "8",
    "--data.max-calibration-pairs", "8", "--data.max-length", "48",
    "--dense.batch-size", "4", "--moe.batch-size", "4", "--merge.batch-size", "4",
    "--merge.statistics-pairs", "8", "--evaluate.bootstrap-samples", "50",
]
QUICK_CONFIG = dict(
    hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=512,
)


def parse_arguments(argv=None):
    parser = common.build_parser(__doc__.splitlines()[0], default_repeats=1, quick_repeats=1)
    parser.add_argument("--run", type=Path, default=None, help="finished pipeline output folder whose metrics.json is read; nothing is run")
    parser.add_argument("--config", type=Path, default=None, help="pipeline YAML config to run first, e.g. configs/quickstart.yaml")
    parser.add_argument("--data", type=Path, default=None, help="local preference file for the pipeline run (default with --quick: the hh-rlhf test file)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="pipeline output folder; with --repeats N > 1 each repeat writes to OUTPUT_DIR/repeat-I (default with --quick: a temporary folder)")
    parser.add_argument("--model", default=None, help="base model of the pipeline run (default: the config's)")
    parser.add_argument("--time-v", action="store_true", help=f"run the pipeline under {TIME_BINARY} -v and report the process-wide maximum RSS")
    arguments = common.parse_arguments(parser, argv)
    if arguments.run is not None and (arguments.config is not None or arguments.quick):
        parser.error("--run reads a finished run; leave out --config and --quick, or leave out --run to run the pipeline.")
    if arguments.run is None and arguments.config is None and not arguments.quick:
        parser.error("give --run DIR to read a finished run, --config FILE (with --data and --output-dir) to run the pipeline, or --quick.")
    if arguments.config is not None and arguments.output_dir is None:
        parser.error("--config needs --output-dir: the pipeline skips stages already complete in an existing folder.")
    if arguments.time_v and not Path(TIME_BINARY).is_file():
        parser.error(f"--time-v needs {TIME_BINARY}, which is missing; install GNU time or leave out --time-v.")
    return arguments


def save_tiny_base_model(folder: Path, model_reference: str) -> Path:
    """Save a tiny random causal LM with the real model's tokenizer as a Hugging Face folder, for --quick."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ummrm.models import load_tokenizer, resolve_model

    tokenizer, _ = load_tokenizer(resolve_model(model_reference))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **QUICK_CONFIG)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_pipeline(command_arguments: list[str], time_v: bool, scratch: Path) -> float | None:
    """Run ``ummrm pipeline`` in a subprocess and return the maximum RSS in MiB from ``/usr/bin/time -v``, or None without it."""
    command = [sys.executable, "-m", "ummrm.cli", "pipeline", *command_arguments]
    time_output = scratch / "time-v.txt"
    if time_v:
        command = [TIME_BINARY, "-v", "-o", str(time_output), *command]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print("running: " + " ".join(command), file=sys.stderr, flush=True)
    # The pipeline's own output goes to stderr, so that stdout carries only this script's report.
    result = subprocess.run(command, cwd=common.REPO_ROOT, env=environment, stdout=sys.stderr)
    if result.returncode != 0:
        raise SystemExit(f"ummrm pipeline failed with exit status {result.returncode}; its output is above, on stderr.")
    if not time_v:
        return None
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_output.read_text())
    if match is None:
        raise SystemExit(f"{TIME_BINARY} -v wrote no 'Maximum resident set size' line to {time_output}.")
    return int(match.group(1)) / 1024


def read_metrics(folder: Path) -> dict:
    """Return a pipeline run's metrics.json, checking that it has a stages section."""
    path = folder / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found; give the output folder of a finished `ummrm pipeline` run.")
    metrics = json.loads(path.read_text())
    if not metrics.get("stages"):
        raise SystemExit(f"{path} has no stages section; it was not written by `ummrm pipeline`.")
    return metrics


def add_stage_table(report: common.Report, runs: list[dict[str, dict]]) -> None:
    """Add one row per stage: peak RSS and seconds, as median and min–max over runs when there are several."""
    names = list(dict.fromkeys(name for stages in runs for name in stages))
    has_cuda = any("peak_cuda_mib" in record for stages in runs for record in stages.values())
    keys = ["peak_rss_mib", "seconds"] + (["peak_cuda_mib"] if has_cuda else [])
    titles = {"peak_rss_mib": "peak RSS MiB", "seconds": "seconds", "peak_cuda_mib": "peak CUDA MiB"}
    report.add("| stage | " + " | ".join(titles[key] for key in keys) + " |")
    report.add("| --- |" + " --- |" * len(keys))
    for name in names:
        cells = [name]
        for key in keys:
            values = [stages[name][key] for stages in runs if name in stages and key in stages[name]]
            cells.append(describe_values(values))
        report.add("| " + " | ".join(cells) + " |")
    report.add()


def describe_values(values: list[float]) -> str:
    if not values:
        return "not recorded"
    if len(values) == 1:
        return f"{values[0]:g}"
    summary = common.summarize(values)
    return f"{summary.median:g} ({summary.low:g}–{summary.high:g})"


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    report = common.Report("stage_memory: peak RSS and seconds per pipeline stage", arguments.quick)

    if arguments.run is not None:
        metrics = read_metrics(arguments.run)
        versions = ", ".join(f"{name} {version}" for name, version in metrics.get("versions", {}).items())
        report.add(f"run read: {arguments.run}; the machine lines above describe where this script ran, which may not be where the pipeline ran")
        report.add(f"versions recorded by the run: {versions or 'none'}")
        add_stage_table(report, [metrics["stages"]])
        report.append_to(arguments.results)
        return 0

    with tempfile.TemporaryDirectory(prefix="ummrm-stage-memory-") as scratch_name:
        scratch = Path(scratch_name)
        config = arguments.config or common.REPO_ROOT / "configs" / "smoke.yaml"
        data = arguments.data or (common.HH_FILE if arguments.quick else None)
        output = arguments.output_dir or scratch / "run"
        flags = ["--config", str(config)]
        if data is not None:
            flags += ["--data", str(data)]
        model = arguments.model
        if arguments.quick:
            model = str(save_tiny_base_model(scratch / "tiny-model", arguments.model or common.MODEL_ALIAS))
            flags += QUICK_OVERRIDES
        if model is not None:
            flags += ["--model", model]

        runs, process_peaks = [], []
        for repeat in range(arguments.repeats):
            folder = output if arguments.repeats == 1 else output / f"repeat-{repeat + 1}"
            peak = run_pipeline(flags + ["--output-dir", str(folder)], arguments.time_v, scratch)
            runs.append(read_metrics(folder)["stages"])
            if peak is not None:
                process_peaks.append(peak)

        model_name = "tiny random Llama on the real tokenizer" if arguments.quick else (arguments.model or "the config's model")
        report.add(f"pipeline: {config} on {data or 'the config data source'}, model {model_name}, {arguments.repeats} run(s)")
        if arguments.quick:
            report.add("quick overrides: " + " ".join(QUICK_OVERRIDES))
        add_stage_table(report, runs)
        if process_peaks:
            report.add(f"process-wide maximum RSS ({TIME_BINARY} -v): {describe_values([round(peak, 1) for peak in process_peaks])} MiB")
    report.append_to(arguments.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
