"""Plots and the Markdown report of the over-optimisation experiment."""

from __future__ import annotations

import json
from pathlib import Path

STYLES = {
    "dense": ("tab:red", "-"),
    "merged": ("tab:blue", "-"),
    "moe": ("tab:cyan", "--"),
    "merged-frequency": ("tab:purple", ":"),
    "merged-uniform": ("tab:pink", ":"),
    "warm": ("tab:green", "-"),
    "ensemble-mean": ("tab:orange", "-"),
    "ensemble-worst": ("tab:brown", "--"),
    "ensemble-uncertainty": ("tab:olive", "--"),
    "gold": ("black", ":"),
}


def write_plots(rows: list[dict], output: Path) -> list[Path]:
    """Write gold.png and proxy.png: gold and standardised proxy score of best-of-N against KL, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(row["method"] for row in rows))
    paths = []
    for name, column, label in (("gold.png", "gold_mean", "gold score of best-of-N"),
                                ("proxy.png", "proxy_z", "proxy score of best-of-N (standard deviations above the pool mean)")):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for method in methods:
            curve = [row for row in rows if row["method"] == method]
            colour, line = STYLES.get(method, (None, "-"))
            kl = [row["kl"] for row in curve]
            axes.plot(kl, [row[column] for row in curve], line, marker="o", markersize=3, color=colour, label=method)
            if column == "gold_mean" and method in ("dense", "merged", "ensemble-mean", "warm"):
                axes.fill_between(kl, [row["gold_low"] for row in curve], [row["gold_high"] for row in curve], color=colour, alpha=0.12)
        axes.set_xlabel("KL(best-of-N || policy) = log N - (N-1)/N  [nats]")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, ncol=2)
        figure.tight_layout()
        path = output / name
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = []
        for _, key in columns:
            value = row[key]
            cells.append(f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(config, record: dict, rows: list[dict], costs: list[dict], output: Path) -> Path:
    """Write report.md: settings, gold and proxy quality, the Best-of-N summary and table, costs and plots."""
    summary = record["summary"]
    largest = summary[0]["largest_n"]
    parts = [
        "# Reward over-optimisation: Best-of-N",
        "",
        f"Policy `{config.policy.model}` (temperature {config.policy.temperature}, top-p {config.policy.top_p}, "
        f"at most {config.policy.max_new_tokens} new tokens). Gold reward model: `{record['gold']['model']}`"
        + (f", trained in the run on `{record['gold']['source']}`" if record["gold"]["trained"] else "") + ". "
        f"Proxies on `{config.model}`, trained on {record['labels']['pairs']} gold-labelled pairs of the policy's samples "
        f"with label noise {config.labels.noise} ({record['labels']['flipped']} flipped). "
        f"Best-of-N on {record['prompts']['held_out']} held-out prompts with a pool of {config.bon.pool_size} samples each; "
        "gold intervals are 95% bootstrap intervals over prompts.",
        "",
    ]
    if "accuracy" in record["gold"]:
        accuracy = record["gold"]["accuracy"]
        parts += [f"Gold accuracy on its own held-out pairs: {accuracy['accuracy']:.3f} "
                  f"[{accuracy['ci_low']:.3f}, {accuracy['ci_high']:.3f}] on {accuracy['pairs']} pairs.", ""]
    parts += [
        "## Summary",
        "",
        "`gold_vs_n1` is the gold score of best-of-N minus that of a single sample (N = 1), which is the same for "
        "every method. A method over-optimises when its gold score falls after its peak while its proxy score "
        "keeps rising. The `gold` row picks by gold itself and is the ceiling.",
        "",
        markdown_table(summary, [("method", "method"), ("gold N=1", "gold_n1"), (f"gold N={largest}", "gold_at_largest_n"),
                         ("low", "gold_low_at_largest_n"), ("high", "gold_high_at_largest_n"), ("peak gold", "peak_gold"),
                         ("peak N", "peak_n"), ("drop from peak", "drop_from_peak")]),
        "",
        "![gold score against KL](gold.png)",
        "",
        "![proxy score against KL](proxy.png)",
        "",
        "## Proxy accuracy on held-out gold-labelled pairs (labels include the noise)",
        "",
        markdown_table([{"model": name, **result} for name, result in record["proxy_accuracy"].items()],
               [("model", "model"), ("accuracy", "accuracy"), ("low", "ci_low"), ("high", "ci_high"), ("pairs", "pairs")]),
        "",
        "## Cost per reward",
        "",
        f"Each model scored the first {config.bon.timing_responses} pool responses with an ordinary forward pass "
        "(no shared-trunk cache), one model after another in one process; an ensemble costs the sum of its "
        "members. The seconds depend on the machine and its load at the time.",
        "",
        markdown_table(costs, [("method", "method"), ("forward passes", "forward_passes_per_reward"),
                       ("seconds per 1,000 responses", "seconds_per_1000_responses"), ("what", "description")]),
        "",
        "## Best-of-N table",
        "",
        markdown_table(rows, [("method", "method"), ("N", "n"), ("KL", "kl"), ("gold", "gold_mean"), ("low", "gold_low"),
                      ("high", "gold_high"), ("gold - gold(N=1)", "gold_vs_n1"), ("proxy", "proxy_mean")]),
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(record["config"], indent=2),
        "```",
        "",
        f"Step times (seconds) and peak memory (MiB), summed and maximised over the {len(record.get('invocations', [])) or 1} "
        "invocation(s) that built this folder: a re-run reuses each finished step in about no time, and a resumed step "
        "redoes only its missing part. `overopt.json` lists each invocation's own times.",
        "",
        "```json",
        json.dumps(record.get("steps_total", record["steps"]), indent=2),
        "```",
        "",
    ]
    path = output / "report.md"
    path.write_text("\n".join(parts))
    return path
