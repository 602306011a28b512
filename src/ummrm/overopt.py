"""The reward over-optimisation experiment: a gold reward model, proxies of every kind, and Best-of-N.

The synthetic-gold protocol: a gold reward model replaces people. A policy samples two responses per
training prompt, and the gold model labels them, with some labels flipped at random. Proxy reward
models of each kind are trained on those labels. On held-out prompts, best-of-N by each proxy is
measured with the gold model.

Output folder of ``run_overopt``::

    prompts.json            training and held-out prompts
    gold/                   the gold reward model, when it is trained in the run
    proxy-data/             the policy's two samples per training prompt, their gold scores, and
                            preferences.jsonl, the labels the proxies learn from
    proxies/                dense/, moe/, merged/ (the learned merge) from the UMM-RM pipeline,
                            merged-frequency/, merged-uniform/, member-1/ ... (ensemble members that
                            differ from dense/ in seed), warm/ (their weight average)
    pool/samples.jsonl      n samples per held-out prompt
    scores/<model>.json     every model's scores of the pool, with the time scoring took
    bon.csv, costs.csv, gold.png, proxy.png, report.md

Every step stores the settings it was made with and is skipped when its output exists, so a re-run
reuses samples, labels, models and scores; output made with other settings is an error.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ummrm.config import (
    DataConfig,
    DenseConfig,
    EvaluateConfig,
    MergeConfig,
    MoEConfig,
    PipelineConfig,
    UpcycleConfig,
    apply_config_mapping,
    option,
    read_config_file,
)
from ummrm.errors import UmmrmError
from ummrm.prompts import PromptSourceConfig
from ummrm.trunk import TrunkCache

logger = logging.getLogger(__name__)


@dataclass
class PolicyConfig:
    model: str = option("smollm2-135m-instruct", "policy that samples responses: any causal LM (Hub id, local folder, .gguf file or the alias)")
    max_new_tokens: int = option(64, "tokens sampled per response at most")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling mass (1: off)")
    max_prompt_tokens: int = option(256, "tokens of a prompt the policy sees; longer prompts lose their start")
    batch_size: int = option(64, "sequences sampled per generate call")
    seed: int = option(0, "seed of sampling")


@dataclass
class PromptsConfig(PromptSourceConfig):
    num_train: int | None = option(512, "training prompts: the policy samples two responses to each for the proxies' labels (none: all not held out)")
    num_held_out: int = option(64, "held-out prompts for Best-of-N")
    seed: int = option(0, "seed of the split by prompt")


@dataclass
class GoldConfig:
    model: str | None = option(None, "a reward model to use as gold (Hub id or folder); none: train one from gold_data with gold_training")
    base_model: str = option("smollm2-135m-instruct", "base model of the gold reward model trained in the run")


@dataclass
class LabelConfig:
    noise: float = option(0.25, "probability that a gold label is flipped")
    seed: int = option(0, "seed of the label flips")


@dataclass
class EnsembleConfig:
    members: int = option(3, "ensemble members M; member 0 is the dense proxy, the others differ in seed")
    learning_rates: str | None = option(None, "comma-separated learning rate per member (none: every member uses dense.learning_rate)")
    uncertainty_weight: float = option(0.5, "lambda of the uncertainty-weighted objective mean - lambda * variance")


@dataclass
class BonConfig:
    pool_size: int = option(32, "samples per held-out prompt; best-of-N is measured for N = 1, 2, 4, ... up to it")
    batch_size: int = option(32, "sequences per forward pass when scoring")
    bootstrap_samples: int = option(1000, "bootstrap resamples over prompts of the 95% gold interval")
    seed: int = option(0, "seed of the bootstrap")
    trunk_cache: bool = option(True, "compute the lower blocks that all reward models share once, and run each model from the first block it trained")
    timing_responses: int = option(256, "responses scored again with an ordinary forward, one model at a time, to measure each method's cost")


SECTIONS: dict[str, type] = {
    "policy": PolicyConfig,
    "prompts": PromptsConfig,
    "gold": GoldConfig,
    "gold_data": DataConfig,
    "gold_training": DenseConfig,
    "labels": LabelConfig,
    "data": DataConfig,
    "dense": DenseConfig,
    "upcycle": UpcycleConfig,
    "moe": MoEConfig,
    "merge": MergeConfig,
    "evaluate": EvaluateConfig,
    "ensemble": EnsembleConfig,
    "bon": BonConfig,
}
# the proxies' preference file is written by the run, so data.source cannot be set
GENERATED_DATA_SOURCE = "proxy-data/preferences.jsonl"


@dataclass
class OveroptConfig:
    model: str = option("smollm2-135m-instruct", "base model of every proxy reward model")
    output_dir: str = option("runs/overopt", "folder that receives the whole experiment")
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    gold: GoldConfig = field(default_factory=GoldConfig)
    gold_data: DataConfig = field(default_factory=DataConfig)
    gold_training: DenseConfig = field(default_factory=DenseConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(source=GENERATED_DATA_SOURCE, data_dir=None))
    dense: DenseConfig = field(default_factory=DenseConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    bon: BonConfig = field(default_factory=BonConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_overopt_config(path: str | Path | None) -> OveroptConfig:
    """Read a YAML experiment config; a missing file, an unknown key or a bad value is an error."""
    if path is None:
        return OveroptConfig()
    raw = read_config_file(path, "configs/overopt-smoke.yaml, overopt-cpu.yaml and overopt-paper.yaml")
    data = raw.get("data")
    if isinstance(data, dict) and "source" in data:
        raise UmmrmError(f"data.source cannot be set in {path}: the proxies learn from the preferences the run writes to {GENERATED_DATA_SOURCE}.")
    config = apply_config_mapping(OveroptConfig(), raw, SECTIONS, ("model", "output_dir"), str(path))
    config.data.source = GENERATED_DATA_SOURCE
    if not isinstance(data, dict) or "data_dir" not in data:
        # DataConfig's default data_dir belongs to its default Hub source, not to the generated file
        config.data.data_dir = None
    return config


def check_config(config: OveroptConfig) -> None:
    """Raise UmmrmError for values that would fail later in the run."""
    if not 0 <= config.labels.noise < 0.5:
        raise UmmrmError(f"labels.noise={config.labels.noise} is invalid: use a flip probability in [0, 0.5).")
    if config.ensemble.members < 2:
        raise UmmrmError(f"ensemble.members={config.ensemble.members} is invalid: an ensemble has at least 2 members.")
    if config.ensemble.uncertainty_weight < 0:
        raise UmmrmError(f"ensemble.uncertainty_weight={config.ensemble.uncertainty_weight} is invalid: it must be 0 or more.")
    if member_learning_rates(config)[0] != config.dense.learning_rate:
        raise UmmrmError(
            f"ensemble.learning_rates starts with {member_learning_rates(config)[0]}, but member 0 is the dense proxy, "
            f"trained with dense.learning_rate={config.dense.learning_rate}; make the first value equal to it."
        )
    if config.bon.timing_responses < 1:
        raise UmmrmError(f"bon.timing_responses={config.bon.timing_responses} is invalid: time at least 1 response.")
    if config.bon.pool_size < 2:
        raise UmmrmError(f"bon.pool_size={config.bon.pool_size} is invalid: best-of-N needs at least 2 samples per prompt.")
    if config.merge.method != "learned":
        raise UmmrmError(f"merge.method={config.merge.method!r}: the experiment always makes all three merges (learned, frequency, uniform); leave merge.method as learned.")
    sampling_settings(config.policy).check()
    from ummrm.rewards import TEXT_FORMATS
    from ummrm.upcycle import resolve_layers

    for name, data in (("data", config.data), ("gold_data", config.gold_data)):
        if data.text_format not in TEXT_FORMATS:
            raise UmmrmError(f"{name}.text_format={data.text_format!r} is invalid; choose one of {', '.join(TEXT_FORMATS)}.")
        if data.max_length < 8:
            raise UmmrmError(f"{name}.max_length={data.max_length} is invalid: use at least 8 tokens.")
    upcycle = config.upcycle
    if not 1 <= upcycle.top_k <= upcycle.num_experts:
        raise UmmrmError(f"upcycle.top_k={upcycle.top_k} is invalid for {upcycle.num_experts} experts: use 1 <= top_k <= num_experts.")
    if not 0 <= upcycle.shared_rate <= 1:
        raise UmmrmError(f"upcycle.shared_rate={upcycle.shared_rate} is invalid: use a rate in [0, 1].")
    # the block count is known only once the model loads; a large stand-in checks the form of the spec
    resolve_layers(upcycle.layers, 10_000)


def member_learning_rates(config: OveroptConfig) -> list[float]:
    """Return the learning rate of each ensemble member."""
    text = config.ensemble.learning_rates
    if text is None or not str(text).strip():
        return [config.dense.learning_rate] * config.ensemble.members
    try:
        rates = [float(item) for item in str(text).split(",")]
    except ValueError:
        raise UmmrmError(f"ensemble.learning_rates={text!r} is invalid: give comma-separated numbers such as 5e-5,1e-4,2e-4.") from None
    if len(rates) != config.ensemble.members:
        raise UmmrmError(f"ensemble.learning_rates has {len(rates)} values for {config.ensemble.members} members; give one per member.")
    return rates


def sampling_settings(policy: PolicyConfig):
    from ummrm.generation import SamplingSettings

    return SamplingSettings(
        max_new_tokens=policy.max_new_tokens, temperature=policy.temperature, top_p=policy.top_p,
        max_prompt_tokens=policy.max_prompt_tokens, batch_size=policy.batch_size, seed=policy.seed,
    )


# ---------------------------------------------------------------- cached steps

def _normalise(value) -> object:
    return json.loads(json.dumps(value, default=str))


def read_cached(path: Path, key: dict):
    """Return the value stored in ``path`` for ``key``, None when absent; another key is an error."""
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    if stored.get("key") != _normalise(key):
        raise UmmrmError(f"{path} was made with other settings than this run's; use a new output folder, or delete {path} to recompute it.")
    logger.info("reusing %s", path)
    return stored["value"]


def write_cached(path: Path, key: dict, value) -> None:
    """Write ``value`` with its ``key`` to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    staging.write_text(json.dumps({"key": _normalise(key), "value": value}))
    staging.replace(path)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- steps

def split_prompt_sets(config: OveroptConfig, output: Path):
    """Load the prompts and split them into training and held-out prompts (cached in prompts.json)."""
    from ummrm.prompts import Prompt, load_prompts, split_prompts

    key = {"prompts": dataclasses.asdict(config.prompts)}
    cached = read_cached(output / "prompts.json", key)
    if cached is None:
        settings = config.prompts
        prompts = load_prompts(settings.source, hub_config=settings.hub_config, data_dir=settings.data_dir, hub_split=settings.hub_split, max_rows=settings.max_rows)
        train, held_out = split_prompts(prompts, settings.num_held_out, settings.num_train, settings.seed)
        cached = {"train": [prompt.to_json() for prompt in train], "held_out": [prompt.to_json() for prompt in held_out]}
        write_cached(output / "prompts.json", key, cached)
    return [Prompt.from_json(item) for item in cached["train"]], [Prompt.from_json(item) for item in cached["held_out"]]


def prepare_gold(config: OveroptConfig, output: Path, record: dict) -> str:
    """Return the gold reward model's reference, training it first when no model is given."""
    from ummrm.pipeline import evaluate_folder, finished, prepare_data, stage_settings, train_dense

    if config.gold.model:
        record["gold"] = {"model": config.gold.model, "trained": False}
        return config.gold.model
    folder = output / "gold"
    settings = stage_settings(config.gold.base_model, config.gold_data, dense=config.gold_training)
    prepared = prepare_data(config.gold_data)
    if not finished(folder, settings):
        logger.info("training the gold reward model on %s", config.gold_data.source)
        train_dense(config.gold.base_model, prepared, config.gold_data, config.gold_training, folder)
    record["gold"] = {"model": str(folder), "trained": True, "source": config.gold_data.source}
    if prepared.splits["eval"]:
        record["gold"]["accuracy"] = evaluate_folder(folder, prepared, config.gold_data, config.evaluate)
    return str(folder)


def score_prompt_responses(model_reference: str, prompts, responses: list[list[str]], data_config: DataConfig, batch_size: int,
                           path: Path, trunk=None, timing_responses: int = 0) -> dict:
    """Score every response of every prompt with one reward model (cached in ``path``).

    Returns ``{"scores": [[...] per prompt], "seconds", "responses", "timing"}``. Each reward model
    encodes the text with its own tokenizer. ``trunk`` (a ``TrunkCache``) lets models with a shared
    frozen trunk skip recomputing it. Because that makes ``seconds`` depend on the order of scoring,
    the cost of one model is measured apart: ``timing`` contains the seconds of an ordinary forward over
    the first ``timing_responses`` responses.
    """
    from ummrm.models import load_reward_model
    from ummrm.rewards import RewardEncoder, score_sequences

    key = {
        "model": model_reference, "responses": _digest([[prompt.to_json() for prompt in prompts], responses]),
        "max_length": data_config.max_length, "max_prompt_length": data_config.max_prompt_length, "text_format": data_config.text_format,
    }
    cached = read_cached(path, key)
    if cached is not None and (cached.get("timing") or not timing_responses):
        return cached
    model, tokenizer = load_reward_model(model_reference)
    encoder = RewardEncoder(tokenizer, data_config.max_length, data_config.max_prompt_length, data_config.text_format)
    sequences = [encoder.encode(prompt.messages, "", response, True) for prompt, group in zip(prompts, responses) for response in group]
    if cached is None:
        started = time.perf_counter()
        if trunk is not None:
            flat = trunk.score(model, sequences, tokenizer.pad_token_id, batch_size)
        else:
            flat = score_sequences(model, sequences, tokenizer.pad_token_id, batch_size)
        seconds = time.perf_counter() - started
        scores, position = [], 0
        for group in responses:
            scores.append(flat[position : position + len(group)])
            position += len(group)
        cached = {"scores": scores, "seconds": seconds, "responses": len(flat), "timing": None}
        logger.info("scored %d responses with %s in %.1f s", len(flat), model_reference, seconds)
    if timing_responses:
        subset = sequences[:timing_responses]
        started = time.perf_counter()
        score_sequences(model, subset, tokenizer.pad_token_id, batch_size)
        cached["timing"] = {"responses": len(subset), "seconds": time.perf_counter() - started}
    write_cached(path, key, cached)
    return cached


def shared_trunk_depth(config: OveroptConfig, proxy_folder: Path, gold_trained: bool) -> int:
    """Return the number of lower blocks that no proxy (nor a gold model trained in the run) changes."""
    from ummrm.upcycle import resolve_layers

    num_layers = json.loads((proxy_folder / "config.json").read_text())["num_hidden_layers"]
    trainable = [config.dense.trainable_layers, config.moe.trainable_layers]
    if gold_trained:
        trainable.append(config.gold_training.trainable_layers)
    if any(count < 0 for count in trainable):
        return 0
    depth = min(num_layers - max(trainable), min(resolve_layers(config.upcycle.layers, num_layers)))
    return max(depth, 0)


def write_preferences(prompts, responses: list[list[str]], gold_scores: list[list[float]], config: LabelConfig, path: Path) -> dict:
    """Write the gold's preference between the two samples of each prompt, flipping ``config.noise`` of them.

    Pairs whose samples are identical or score equally under gold carry no preference and are skipped
    and counted. Returns the counts.
    """
    rng = random.Random(config.seed)
    counts = {"pairs": 0, "flipped": 0, "identical_responses": 0, "gold_ties": 0}
    staging = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    with staging.open("w") as handle:
        for prompt, (first, second), (first_score, second_score) in zip(prompts, responses, gold_scores):
            # one draw per prompt, skipped or not, so that the flips do not depend on which pairs are skipped
            flip = rng.random() < config.noise
            if first.strip() == second.strip():
                counts["identical_responses"] += 1
                continue
            if first_score == second_score:
                counts["gold_ties"] += 1
                continue
            chosen, rejected = (first, second) if first_score > second_score else (second, first)
            if flip:
                chosen, rejected = rejected, chosen
                counts["flipped"] += 1
            counts["pairs"] += 1
            row = {"prompt": prompt.to_json(), "chosen": chosen, "rejected": rejected, "gold_margin": abs(first_score - second_score), "flipped": flip}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    staging.replace(path)
    logger.info("wrote %d gold-labelled pairs to %s (%d flipped; skipped %d identical, %d gold ties)",
                counts["pairs"], path, counts["flipped"], counts["identical_responses"], counts["gold_ties"])
    return counts


def make_proxy_data(config: OveroptConfig, output: Path, train_prompts, gold_reference: str, record: dict) -> Path:
    """Sample two responses per training prompt, score them with gold and write the noisy preference file."""
    from ummrm.generation import sample_responses

    folder = output / "proxy-data"
    responses = sample_responses(config.policy.model, train_prompts, 2, sampling_settings(config.policy), folder / "samples.jsonl")
    gold = score_prompt_responses(gold_reference, train_prompts, responses, config.gold_data, config.bon.batch_size, folder / "gold-scores.json")
    path = folder / "preferences.jsonl"
    key = {"labels": dataclasses.asdict(config.labels), "gold_scores": _digest(gold["scores"]), "responses": _digest(responses)}
    counts = read_cached(folder / "labels.json", key)
    if counts is None or not path.is_file():
        counts = write_preferences(train_prompts, responses, gold["scores"], config.labels, path)
        write_cached(folder / "labels.json", key, counts)
    record["labels"] = counts
    return path


def train_proxies(config: OveroptConfig, output: Path, record: dict) -> dict[str, Path]:
    """Train every proxy: the UMM-RM pipeline (dense, MoE, learned merge), the other merges, the ensemble and WARM."""
    from ummrm.ensemble import weight_average
    from ummrm.pipeline import evaluate_folder, finished, merge, prepare_data, run_pipeline, stage_settings, train_dense, write_json

    folder = output / "proxies"
    data_config = dataclasses.replace(config.data, source=str(output / GENERATED_DATA_SOURCE))
    pipeline_config = PipelineConfig(
        model=config.model, output_dir=str(folder), data=data_config, dense=config.dense, upcycle=config.upcycle,
        moe=config.moe, merge=config.merge, evaluate=config.evaluate,
    )
    metrics = run_pipeline(pipeline_config)
    record["proxy_accuracy"] = dict(metrics["accuracy"])
    prepared = prepare_data(data_config)
    moe_settings = stage_settings(config.model, data_config, dense=config.dense, upcycle=config.upcycle, moe=config.moe)

    models = {"dense": folder / "dense", "moe": folder / "moe", "merged": folder / "merged"}
    for method in ("frequency", "uniform"):
        merge_config = dataclasses.replace(config.merge, method=method)
        target = folder / f"merged-{method}"
        settings = {**moe_settings, "merge": dataclasses.asdict(merge_config)}
        if not finished(target, settings):
            merge(folder / "moe", prepared, data_config, merge_config, target, settings)
        models[f"merged-{method}"] = target

    members = [folder / "dense"]
    for index, learning_rate in enumerate(member_learning_rates(config)[1:], start=1):
        member_config = dataclasses.replace(config.dense, seed=config.dense.seed + index, learning_rate=learning_rate)
        target = folder / f"member-{index}"
        if not finished(target, stage_settings(config.model, data_config, dense=member_config)):
            logger.info("training ensemble member %d (seed %d, learning rate %g)", index, member_config.seed, learning_rate)
            train_dense(config.model, prepared, data_config, member_config, target)
        members.append(target)
        models[f"member-{index}"] = target

    warm = folder / "warm"
    warm_settings = {"stage": "warm", "members": [str(member) for member in members],
                     "member_settings": [json.loads((member / "ummrm.json").read_text())["settings"] for member in members]}
    if not finished(warm, warm_settings):
        weight_average([str(member) for member in members], warm)
        write_json(warm / "ummrm.json", {"stage": "warm", "settings": warm_settings})
    models["warm"] = warm

    for name, path in models.items():
        if name not in record["proxy_accuracy"]:
            record["proxy_accuracy"][name] = evaluate_folder(path, prepared, data_config, config.evaluate)
    record["ensemble_members"] = [str(member) for member in members]
    return models


# ---------------------------------------------------------------- methods and Best-of-N

@dataclass
class Method:
    """A way to pick the best response: its name, how it scores, and what one reward costs."""

    name: str
    scores: np.ndarray
    forward_passes: int
    seconds_per_1000: float
    description: str


def build_methods(config: OveroptConfig, scores: dict[str, dict], members: list[str]) -> list[Method]:
    """Turn each model's pool scores into the methods compared: single models and ensemble objectives."""
    from ummrm.ensemble import combine_rewards

    def per_1000(name: str) -> float:
        timing = scores[name]["timing"]
        return 1000 * timing["seconds"] / timing["responses"]

    single = [
        ("dense", "dense reward model"),
        ("warm", f"WARM: weight average of the {len(members)} ensemble members"),
        ("moe", "MoE reward model before merging"),
        ("merged", "UMM-RM: experts merged with learned weights"),
        ("merged-frequency", "experts merged with routing-frequency weights"),
        ("merged-uniform", "experts merged with uniform weights"),
    ]
    methods = [Method(name, np.asarray(scores[name]["scores"]), 1, per_1000(name), description) for name, description in single]
    stacked = np.stack([np.asarray(scores[member]["scores"]) for member in members])
    ensemble_seconds = sum(per_1000(member) for member in members)
    weight = config.ensemble.uncertainty_weight
    for objective, description in (("mean", "mean"), ("worst", "worst case (minimum)"), ("uncertainty", f"mean - {weight} x variance")):
        combined = np.stack([combine_rewards(stacked[:, prompt, :], objective, weight).numpy() for prompt in range(stacked.shape[1])])
        methods.append(Method(f"ensemble-{objective}", combined, len(members), ensemble_seconds, f"ensemble of {len(members)}, {description}"))
    methods.append(Method("gold", np.asarray(scores["gold"]["scores"]), 1, per_1000("gold"), "gold reward model itself (the ceiling, not a proxy)"))
    return methods


def best_of_n_table(methods: list[Method], gold: np.ndarray, config: BonConfig) -> list[dict]:
    """Return one row per (method, N) with KL, gold mean and interval, gold relative to N = 1 and proxy mean.

    ``proxy_z`` is the proxy mean in standard deviations of the method's own scores over the pool,
    above their mean, so that proxies of different scales share one axis.
    """
    from ummrm.bon import best_of_n_curve

    rows = []
    for method in methods:
        curve = best_of_n_curve(method.scores, gold, config.bootstrap_samples, config.seed)
        baseline = curve[0]["gold_mean"]
        spread = float(method.scores.std()) or 1.0
        for point in curve:
            proxy_z = (point["proxy_mean"] - float(method.scores.mean())) / spread
            rows.append({"method": method.name, **point, "gold_vs_n1": point["gold_mean"] - baseline, "proxy_z": proxy_z})
    return rows


BON_COLUMNS = ("method", "n", "kl", "gold_mean", "gold_low", "gold_high", "gold_vs_n1", "proxy_mean", "proxy_z")


def write_csv(path: Path, rows: list[dict], columns) -> None:
    staging = path.with_name(path.name + ".partial")
    with staging.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()})
    staging.replace(path)


# ---------------------------------------------------------------- the experiment

def run_overopt(config: OveroptConfig) -> dict:
    """Run the whole experiment into ``config.output_dir`` and return its summary."""
    from ummrm.generation import sample_responses
    from ummrm.pipeline import library_versions, measure, write_json
    from ummrm.report import write_plots, write_report

    check_config(config)
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    record: dict = {"config": config.to_dict(), "versions": library_versions(), "steps": {}}
    steps = record["steps"]

    with measure(steps.setdefault("prompts", {})):
        train_prompts, held_out = split_prompt_sets(config, output)
    record["prompts"] = {"train": len(train_prompts), "held_out": len(held_out)}
    with measure(steps.setdefault("gold", {})):
        gold_reference = prepare_gold(config, output, record)
    with measure(steps.setdefault("proxy_data", {})):
        make_proxy_data(config, output, train_prompts, gold_reference, record)
    with measure(steps.setdefault("proxies", {})):
        models = train_proxies(config, output, record)
    with measure(steps.setdefault("pool", {})):
        pool = sample_responses(config.policy.model, held_out, config.bon.pool_size, sampling_settings(config.policy), output / "pool" / "samples.jsonl")

    scores = {}
    trunk = TrunkCache(shared_trunk_depth(config, models["dense"], record["gold"]["trained"])) if config.bon.trunk_cache else None
    timing = config.bon.timing_responses
    with measure(steps.setdefault("scoring", {})):
        # the dense proxy fills the trunk cache; a gold model from elsewhere is scored without it
        for name, folder in models.items():
            scores[name] = score_prompt_responses(str(folder), held_out, pool, config.data, config.bon.batch_size, output / "scores" / f"{name}.json", trunk, timing)
        scores["gold"] = score_prompt_responses(gold_reference, held_out, pool, config.gold_data, config.bon.batch_size, output / "scores" / "gold.json", trunk, timing)
    if trunk is not None:
        record["trunk_cache"] = {"depth": trunk.depth, **trunk.uses}

    members = ["dense"] + [f"member-{index}" for index in range(1, config.ensemble.members)]
    methods = build_methods(config, scores, members)
    gold = np.asarray(scores["gold"]["scores"])
    rows = best_of_n_table(methods, gold, config.bon)
    write_csv(output / "bon.csv", rows, BON_COLUMNS)
    costs = [{"method": m.name, "forward_passes_per_reward": m.forward_passes, "seconds_per_1000_responses": m.seconds_per_1000, "description": m.description} for m in methods]
    write_csv(output / "costs.csv", costs, ("method", "forward_passes_per_reward", "seconds_per_1000_responses", "description"))
    write_plots(rows, output)
    record["summary"] = summarise(rows)
    record["invocations"] = previous_invocations(output / "overopt.json") + [{"finished": utc_now(), "steps": steps}]
    record["steps_total"] = total_steps(record["invocations"])
    write_json(output / "overopt.json", record)
    write_report(config, record, rows, costs, output)
    return record


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def previous_invocations(path: Path) -> list[dict]:
    """Return the step records of the invocations that built this folder before, from its overopt.json."""
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        logger.warning("%s is not valid JSON; the step times of earlier invocations are lost", path)
        return []
    if "invocations" in old:
        return old["invocations"]
    # written before invocations were kept: its steps are those of the latest invocation only
    return [{"finished": None, "steps": old["steps"]}] if "steps" in old else []


def total_steps(invocations: list[dict]) -> dict:
    """Return, per step, the seconds summed and the peak memory maximised over ``invocations``.

    A re-run reuses the cached output of each finished step in about no time, and a resumed step
    does only its missing part, so the sum is the time the step's output took to make.
    """
    total: dict[str, dict] = {}
    for invocation in invocations:
        for name, step in invocation["steps"].items():
            into = total.setdefault(name, {"seconds": 0.0})
            into["seconds"] = round(into["seconds"] + step.get("seconds", 0.0), 2)
            for key in ("peak_rss_mib", "peak_cuda_mib"):
                if key in step:
                    into[key] = max(into.get(key, 0.0), step[key])
    return total


def summarise(rows: list[dict]) -> list[dict]:
    """Return, per method, gold at N = 1 and at the largest N, and the peak gold with the N where it peaks."""
    summary = []
    for name in dict.fromkeys(row["method"] for row in rows):
        curve = [row for row in rows if row["method"] == name]
        peak = max(curve, key=lambda row: row["gold_mean"])
        last = curve[-1]
        summary.append({
            "method": name, "gold_n1": curve[0]["gold_mean"], "largest_n": last["n"], "gold_at_largest_n": last["gold_mean"],
            "gold_low_at_largest_n": last["gold_low"], "gold_high_at_largest_n": last["gold_high"],
            "peak_gold": peak["gold_mean"], "peak_n": peak["n"], "drop_from_peak": peak["gold_mean"] - last["gold_mean"],
        })
    return summary


# ---------------------------------------------------------------- dry run

def check_reference(reference: str, kind: str) -> str:
    """Check that a model or dataset reference resolves, and return how it was checked.

    Local paths and the SmolLM2 alias are checked fully. A Hub id is checked against the Hub when it
    can be reached. Otherwise only its form is checked, and the returned text states that.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from ummrm.models import SMOLLM2_ALIAS, smollm2_gguf_path

    if kind == "model" and reference == SMOLLM2_ALIAS:
        return f"alias of {smollm2_gguf_path()}"
    path = Path(reference).expanduser()
    if path.exists():
        if kind == "model" and path.is_dir() and not (path / "config.json").is_file():
            raise UmmrmError(f"{reference} is a folder without config.json; give a Hugging Face model folder.")
        return f"local {'folder' if path.is_dir() else 'file'}"
    if reference.startswith((".", "/", "~")) or reference.count("/") > 1 or path.suffix in (".gguf", ".json", ".jsonl", ".gz", ".csv", ".parquet"):
        raise UmmrmError(f"{kind} {reference} not found: the path does not exist.")
    try:
        validate_repo_id(reference)
    except HFValidationError as error:
        raise UmmrmError(f"{kind} {reference!r} is neither an existing path nor a valid Hub id: {error}") from None
    return _check_on_hub(reference, kind)


def _check_on_hub(reference: str, kind: str) -> str:
    import os

    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "Hub id (HF_HUB_OFFLINE is set: its existence was not checked)"
    api = HfApi()
    try:
        if kind == "model":
            api.model_info(reference, timeout=10)
        else:
            api.dataset_info(reference, timeout=10)
    except GatedRepoError:
        return "Hub id of a gated repository: accept its licence on the Hub and log in before running"
    except RepositoryNotFoundError:
        raise UmmrmError(f"the Hugging Face Hub has no {kind} {reference!r}; check the id.") from None
    except Exception as error:  # noqa: BLE001 - any network failure means the Hub is unreachable from here
        return f"Hub id (the Hub could not be reached, {type(error).__name__}: existence not checked)"
    return "found on the Hub"


def plan_overopt(config: OveroptConfig) -> list[str]:
    """Validate a config without running it, and return the planned work as lines of text."""
    check_config(config)
    lines = ["references:"]
    references = [("policy.model", config.policy.model, "model"), ("model (proxy base)", config.model, "model"),
                  ("prompts.source", config.prompts.source, "dataset")]
    if config.gold.model:
        references.append(("gold.model", config.gold.model, "model"))
    else:
        references += [("gold.base_model", config.gold.base_model, "model"), ("gold_data.source", config.gold_data.source, "dataset")]
    for name, reference, kind in references:
        lines.append(f"  {name}: {reference} -> {check_reference(reference, kind)}")

    prompts = config.prompts
    if Path(prompts.source).expanduser().is_file():
        from ummrm.prompts import load_prompts, split_prompts

        found = load_prompts(prompts.source, max_rows=prompts.max_rows)
        train, held_out = split_prompts(found, prompts.num_held_out, prompts.num_train, prompts.seed)
        counts = f"{len(found)} distinct prompts: {len(train)} for training, {len(held_out)} held out"
    else:
        train_count = "all not held out" if prompts.num_train is None else prompts.num_train
        counts = f"{train_count} for training, {prompts.num_held_out} held out (counted when the run loads the source)"
    num_train = prompts.num_train or 0
    pool = prompts.num_held_out * config.bon.pool_size
    members = config.ensemble.members
    from ummrm.bon import n_values

    policy = config.policy
    lines += [
        "planned work:",
        f"  prompts: {counts}",
        "  gold: " + (f"use {config.gold.model}" if config.gold.model else
                      f"train a dense reward model on {config.gold.base_model} from {config.gold_data.source} "
                      f"({config.gold_training.epochs} epochs, batch {config.gold_training.batch_size}, learning rate {config.gold_training.learning_rate})"),
        f"  proxy data: {2 * num_train} samples (2 per training prompt, at most {policy.max_new_tokens} new tokens each), "
        f"labelled by gold with noise {config.labels.noise}",
        f"  proxies on {config.model}: dense and {members - 1} more ensemble members ({config.dense.epochs} epochs each, "
        f"learning rates {member_learning_rates(config)}), WARM of the {members}, MoE ({config.upcycle.num_experts} experts, "
        f"top-{config.upcycle.top_k}, layers {config.upcycle.layers}, {config.moe.epochs} epochs), merges: learned, frequency, uniform",
        f"  pool: {prompts.num_held_out} held-out prompts x {config.bon.pool_size} samples = {pool} samples",
        f"  scoring: {pool} responses x {members + 6} reward models (gold, {members} members, WARM, MoE, 3 merged) = {pool * (members + 6)} rewards",
        f"  Best-of-N for N in {n_values(config.bon.pool_size)} for 10 methods, into {config.output_dir}",
    ]
    return lines
