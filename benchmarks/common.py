"""Helpers shared by the benchmark scripts: command-line options, machine description, the alternating
timing loop, summary statistics and appending a run to RESULTS.md."""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# The benchmarks send no network traffic, because models come from local folders or the offline alias.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "RESULTS.md"
# Real preference data, expected beside the repository as for the integration tests.
HH_FILE = REPO_ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
MODEL_ALIAS = "smollm2-135m-instruct"
# A LlamaConfig reward model small enough for seconds of runtime, for --quick; the vocabulary comes from
# the real tokenizer.
QUICK_REWARD_CONFIG = dict(
    hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=512, num_labels=1,
)

RESULTS_HEADER = """\
# Benchmark results

Each section below is one run of a script in `benchmarks/`, appended by the script itself with the
machine it ran on and the exact command. Contenders are timed side by side in the same process: every
repeat runs each contender once, and the order rotates from one repeat to the next. Times are reported
as median, interquartile range (IQR) and min–max over repeats. Ratios are computed per repeat and then
summarised the same way. `--quick` runs use tiny random models. They check that a script works, and
their numbers do not show whether a target is met.

| script | measures | target |
| --- | --- | --- |
| `moe_layer.py` | forward+backward time of ummrm's `MoEFeedForward` against transformers' `Qwen2MoeSparseMoeBlock`, SmolLM2-135M shapes, 4 experts, top-2, one shared expert | ummrm/Qwen2-MoE time ≤ 1.0 |
| `train_step.py` | time of one training step (ummrm Trainer loss, backward, gradient clipping, AdamW) of the upcycled MoE reward model against the dense one, divided by the analytic FLOPs ratio | (time ratio)/(FLOPs ratio) ≤ 1.15 |
| `trl_throughput.py` | dense reward-model training throughput (pairs/s) of `ummrm.training.train_reward_model` against TRL's `RewardTrainer` on the same model, pairs and settings | ummrm/TRL pairs/s ≥ 1.0 |
| `scoring.py` | scoring throughput (responses/s) of the merged, dense and unmerged MoE models and of an ensemble of 3 dense models | merged ≥ 0.98 × dense, merged ≥ 2.8 × ensemble |
| `stage_memory.py` | peak resident memory and seconds of each pipeline stage, read from a pipeline's `metrics.json` | none (a record) |
| `load.py` | requests/s, items/s, p50 and p99 latency and errors of a running `ummrm serve` under concurrent `/get_reward` clients on loopback | none (a record) |

Re-run a benchmark from the repository root with its virtual environment active:

```bash
OMP_NUM_THREADS=2 python benchmarks/moe_layer.py --repeats 20
OMP_NUM_THREADS=2 python benchmarks/train_step.py --repeats 5
OMP_NUM_THREADS=2 python benchmarks/trl_throughput.py --repeats 3
OMP_NUM_THREADS=2 python benchmarks/scoring.py --repeats 3
python benchmarks/stage_memory.py --config configs/quickstart.yaml --data ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz --output-dir runs/quickstart-memory --time-v
```

Every script takes `--quick` (tiny models, seconds), `--repeats N`, `--threads N` and `--results FILE`
(default: this file); `--help` lists the rest.
"""


# ---------------------------------------------------------------- options

def build_parser(description: str, default_repeats: int, quick_repeats: int) -> argparse.ArgumentParser:
    """Return a parser with the options every benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny random models and few repeats, to check that the script works (seconds)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed repeats; each runs every contender once (default: {default_repeats}, {quick_repeats} with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each contender before the repeats (default: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own, which follows OMP_NUM_THREADS)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help=f"Markdown file that the run is appended to (default: {DEFAULT_RESULTS.relative_to(REPO_ROOT)})")
    parser.set_defaults(default_repeats=default_repeats, quick_repeats=quick_repeats)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line, fill in the repeat count and apply ``--threads``."""
    import torch

    arguments = parser.parse_args(argv)
    if arguments.repeats is None:
        arguments.repeats = arguments.quick_repeats if arguments.quick else arguments.default_repeats
    if arguments.repeats < 1:
        parser.error(f"--repeats {arguments.repeats} is invalid; give at least 1.")
    if arguments.warmup < 0:
        parser.error(f"--warmup {arguments.warmup} is invalid; give 0 or more.")
    if arguments.threads is not None:
        if arguments.threads < 1:
            parser.error(f"--threads {arguments.threads} is invalid; give at least 1.")
        torch.set_num_threads(arguments.threads)
    return arguments


# ---------------------------------------------------------------- machine

def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or what ``platform`` reports where there is none."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_description() -> dict[str, str]:
    """Describe the machine, libraries and command of this run."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + shlex.join(sys.argv),
        "cpu": cpu_model(),
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "load average at start (1 min)": f"{load[0]:.2f}" if load else "unknown",
        "threads": f"torch {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "versions": (
            f"python {platform.python_version()}, torch {torch.__version__}, transformers {package_version('transformers')}, "
            f"trl {package_version('trl')}, ummrm {package_version('ummrm')}"
        ),
        "platform": platform.platform(),
    }


def max_rss_mib() -> float:
    """Return this process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# ---------------------------------------------------------------- timing

# A contender runs once and returns the seconds of its timed part, or a mapping of named parts that
# includes "total".
Contender = Callable[[], "float | dict[str, float]"]


def timed(function: Callable[[], object]) -> Callable[[], float]:
    """Wrap ``function`` into a contender that times the whole call."""
    def run() -> float:
        start = time.perf_counter()
        function()
        return time.perf_counter() - start

    return run


def run_alternating(contenders: dict[str, Contender], repeats: int, warmup: int, progress: bool = True) -> dict[str, dict[str, list[float]]]:
    """Run every contender once per repeat, rotating the order, and return ``{name: {part: [seconds per repeat]}}``.

    With two contenders the order is AB, BA, AB, ..., so that a slow drift of the machine (another
    job, thermal throttling) falls on both. Warm-up runs come first and are not recorded.
    """
    names = list(contenders)
    for round_index in range(warmup):
        for name in names:
            contender_result(contenders[name]())
            if progress:
                print(f"warm-up {round_index + 1}/{warmup}: {name} done", file=sys.stderr, flush=True)

    results: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            # otherwise the collector would run at a random point inside one contender's timing
            gc.disable()
            try:
                parts = contender_result(contenders[name]())
            finally:
                gc.enable()
            for part, seconds in parts.items():
                results[name].setdefault(part, []).append(seconds)
            if progress:
                print(f"repeat {repeat + 1}/{repeats}: {name} {parts['total']:.4f} s", file=sys.stderr, flush=True)
    return results


def contender_result(value) -> dict[str, float]:
    if isinstance(value, dict):
        if "total" not in value:
            raise ValueError(f"a contender returned parts {sorted(value)} without 'total'")
        return value
    return {"total": float(value)}


# ---------------------------------------------------------------- statistics

@dataclass
class Summary:
    """Median and spread of a list of values."""

    median: float
    q1: float
    q3: float
    low: float
    high: float
    count: int

    def describe(self, digits: int = 4, unit: str = "") -> str:
        def number(value: float) -> str:
            return f"{value:.{digits}g}{unit}"

        return (
            f"median {number(self.median)} (IQR {number(self.q1)}–{number(self.q3)}, "
            f"min–max {number(self.low)}–{number(self.high)}, n={self.count})"
        )


def summarize(values: list[float]) -> Summary:
    if not values:
        raise ValueError("cannot summarise an empty list of values")
    if len(values) == 1:
        q1 = q3 = values[0]
    else:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Summary(statistics.median(values), q1, q3, min(values), max(values), len(values))


def per_repeat_ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    """Return ``numerator / denominator`` for each repeat; both lists come from the same repeats."""
    if len(numerators) != len(denominators):
        raise ValueError(f"cannot divide {len(numerators)} values by {len(denominators)} values, because ratios pair values from the same repeat")
    return [numerator / denominator for numerator, denominator in zip(numerators, denominators)]


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    """Return whether a median meets a target, as text for the report."""
    met = value >= target if higher_is_better else value <= target
    sign = "≥" if higher_is_better else "≤"
    return f"target {sign} {target:g}: {'met' if met else 'NOT met'}"


# ---------------------------------------------------------------- report

def markdown_line(line: str) -> str:
    """Return a report line as Markdown: table rows, list items and blank lines as they are, other text as a list item."""
    if not line.strip() or line.lstrip().startswith(("|", "- ")):
        return line
    return f"- {line}"


class Report:
    """Lines of one run's result: printed as they are added, then appended to RESULTS.md."""

    def __init__(self, title: str, quick: bool):
        self.title = title + (" (quick)" if quick else "")
        self.machine = machine_description()
        self.lines: list[str] = []
        print(f"== {self.title}")
        for key, value in self.machine.items():
            print(f"{key}: {value}")

    def add(self, line: str = "") -> None:
        # Markdown needs a blank line between a table and the text above it
        if line.startswith("|") and self.lines and self.lines[-1].strip() and not self.lines[-1].startswith("|"):
            self.add()
        print(line, flush=True)
        self.lines.append(line)

    def add_time_table(self, times: dict[str, list[float]], unit_name: str = "seconds", scale: float = 1.0, digits: int = 4) -> None:
        """Add a Markdown table with one row per contender: median, IQR and min–max of ``values * scale``."""
        self.add(f"| contender | median {unit_name} | IQR | min–max | repeats |")
        self.add("| --- | --- | --- | --- | --- |")
        for name, values in times.items():
            summary = summarize([value * scale for value in values])
            self.add(
                f"| {name} | {summary.median:.{digits}g} | {summary.q1:.{digits}g}–{summary.q3:.{digits}g} | "
                f"{summary.low:.{digits}g}–{summary.high:.{digits}g} | {summary.count} |"
            )
        self.add()

    def add_ratio(self, name: str, ratios: list[float], target: float | None = None, higher_is_better: bool = False) -> Summary:
        """Add one ``ratio NAME: ...`` line for per-repeat ratios, with the target verdict when there is one."""
        summary = summarize(ratios)
        line = f"ratio {name}: {summary.describe(digits=3)}"
        if target is not None:
            line += f"; {verdict(summary.median, target, higher_is_better)}"
        self.add(line)
        return summary

    def append_to(self, path: Path) -> None:
        """Append this run as a dated section of ``path``, creating the file with its header when missing."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.stat().st_size == 0:
            path.write_text(RESULTS_HEADER)
        self.add(f"max RSS of this benchmark process: {max_rss_mib():.0f} MiB")
        section = [f"\n## {self.machine['date']} · {self.title}\n"]
        section += [f"- {key}: `{value}`" if key == "command" else f"- {key}: {value}" for key, value in self.machine.items()]
        section.append("")
        section += [markdown_line(line) for line in self.lines]
        with path.open("a") as results:
            results.write("\n".join(section).rstrip() + "\n")
        print(f"appended to {path}")
