"""The stages of UMM-RM as library calls, and the pipeline that runs them into one output folder.

Output folder of ``run_pipeline``::

    dense/     the dense reward model (Hugging Face folder) and its ummrm.json
    moe/       the trained MoE reward model, with moe_config.json
    merged/    the merged dense reward model, with merge.json
    metrics.json

Each stage folder is written under a temporary name and renamed when complete. It carries an
``ummrm.json`` with the settings that made it, and a stage whose folder is complete is not run again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import resource
import shutil
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

from ummrm.config import DataConfig, DenseConfig, EvaluateConfig, MergeConfig, MoEConfig, PipelineConfig, UpcycleConfig
from ummrm.errors import UmmrmError

logger = logging.getLogger(__name__)

METADATA_NAME = "ummrm.json"
CHECKPOINTS_SUFFIX = ".checkpoints"
EVALUATION_NAME = "evaluation.json"
# an unperturbed upcycled model must give the dense model's rewards to this tolerance (fp32)
UPCYCLE_TOLERANCE = 1e-5
CHECK_PAIRS = 8


# ---------------------------------------------------------------- data

@dataclasses.dataclass
class PreparedData:
    """Preference data loaded once and split by prompt."""

    data: object
    splits: dict

    @property
    def skipped(self) -> Counter:
        return Counter(self.data.skipped)


def prepare_data(config: DataConfig) -> PreparedData:
    from ummrm.data import load_preferences, split_by_prompt

    hub_options = {"config_name": config.hub_config, "data_dir": config.data_dir, "split": config.hub_split}
    if Path(config.source).expanduser().is_file():
        # a preset names Hub options for its default source; they do not apply to a local file given with --data
        hub_options = {}
    data = load_preferences(config.source, max_rows=config.max_rows, **hub_options)
    logger.info("%s: %s", data.source, data.skip_summary())
    splits = split_by_prompt(data.pairs, eval_fraction=config.eval_fraction, calibration_fraction=config.calibration_fraction, seed=config.split_seed)
    limits = {"train": config.max_train_pairs, "eval": config.max_eval_pairs, "calibration": config.max_calibration_pairs}
    for name, limit in limits.items():
        if limit is not None:
            splits[name] = splits[name][:limit]
    logger.info("split by prompt: %s", ", ".join(f"{name} {len(pairs)} pairs" for name, pairs in splits.items()))
    return PreparedData(data, splits)


def make_encoder(tokenizer, config: DataConfig):
    from ummrm.rewards import RewardEncoder

    return RewardEncoder(tokenizer, config.max_length, config.max_prompt_length, config.text_format)


def encode_split(encoder, prepared: PreparedData, split: str, skipped: Counter):
    encoded, split_skipped = encoder.encode_pairs(prepared.splits[split])
    skipped.update(split_skipped)
    return encoded


# ---------------------------------------------------------------- measurement

@contextmanager
def measure(record: dict):
    """Record wall seconds and peak resident memory (MiB) of the enclosed block into ``record``."""
    peak = {"rss": _rss_mib()}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.1):
            peak["rss"] = max(peak["rss"], _rss_mib())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        yield record
    finally:
        stop.set()
        thread.join()
        record["seconds"] = round(time.perf_counter() - start, 2)
        record["peak_rss_mib"] = round(max(peak["rss"], _rss_mib()), 1)
        if torch.cuda.is_available():
            record["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _rss_mib() -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    # no /proc (macOS): the process-lifetime peak is the best available figure
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def library_versions() -> dict:
    import importlib.metadata

    versions = {"python": platform.python_version()}
    for package in ("ummrm", "torch", "transformers", "accelerate", "datasets", "safetensors"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


# ---------------------------------------------------------------- folders

def write_json(path: Path, payload: dict) -> None:
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(json.dumps(payload, indent=2, default=str))
    temporary.replace(path)


def read_metadata(folder: Path) -> dict | None:
    path = folder / METADATA_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def finished(folder: Path, settings: dict) -> bool:
    """Tell whether a stage folder is complete; a complete one made with other settings is an error."""
    metadata = read_metadata(folder)
    if metadata is None:
        return False
    if metadata.get("settings") != json.loads(json.dumps(settings, default=str)):
        raise UmmrmError(
            f"{folder} was made with other settings than this run's; use a new output folder, or delete {folder} "
            "to recompute it and the stages after it."
        )
    return True


def save_stage(model, tokenizer, folder: Path, metadata: dict) -> None:
    """Save a finished stage's model with its metadata, then drop its training checkpoints."""
    from ummrm.models import save_reward_model

    save_reward_model(model, tokenizer, folder)
    write_json(folder / METADATA_NAME, metadata)
    shutil.rmtree(folder.with_name(folder.name + CHECKPOINTS_SUFFIX), ignore_errors=True)


def checkpoint_folder(output: Path, settings: dict) -> Path:
    """Return the checkpoint folder of a training stage, emptied first if it contains another run's checkpoints.

    Checkpoints left by an interrupted run with the same settings are kept, so training resumes from them.
    """
    folder = output.with_name(output.name + CHECKPOINTS_SUFFIX)
    if not is_main_process():
        # under `accelerate launch` only the first process tidies the folder; the Trainer writes there from rank 0
        return folder
    marker = folder / "ummrm-settings.json"
    settings = json.loads(json.dumps(settings, default=str))
    if folder.exists() and (not marker.is_file() or json.loads(marker.read_text()) != settings):
        logger.warning("removing checkpoints in %s: they were made with other settings than this run's", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(marker, settings)
    return folder


def wait_for_other_processes() -> None:
    """Block until every process of a distributed launch gets here; a single process returns at once."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def is_main_process() -> bool:
    """Tell whether this is the first process of a distributed launch (or the only process)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


# ---------------------------------------------------------------- stages

def train_dense(model_reference: str, prepared: PreparedData, data_config: DataConfig, config: DenseConfig, output: Path) -> dict:
    """Train a dense Bradley-Terry reward model on the training split and save it to ``output``."""
    from ummrm.models import create_reward_model
    from ummrm.training import TrainSettings, train_reward_model

    model, tokenizer = create_reward_model(model_reference, seed=config.seed)
    encoder = make_encoder(tokenizer, data_config)
    skipped = Counter()
    pairs = encode_split(encoder, prepared, "train", skipped)
    settings = TrainSettings(**dataclasses.asdict(config))
    checkpoints = checkpoint_folder(output, stage_settings(model_reference, data_config, dense=config))
    summary = train_reward_model(model, tokenizer.pad_token_id, pairs, checkpoints, settings)
    if summary["is_world_process_zero"]:
        save_stage(model, tokenizer, output, {
            "stage": "dense",
            "settings": stage_settings(model_reference, data_config, dense=config),
            "base_model": model_reference,
            "text": encoder.describe(),
            "skipped": dict(prepared.skipped + skipped),
            "training": summary,
        })
    return summary


def upcycle_model(dense_folder: Path, config: UpcycleConfig, check_pairs: list | None, data_config: DataConfig):
    """Load a dense reward model, upcycle it and compare rewards on a few pairs.

    Returns ``(model, tokenizer, check)`` where ``check`` contains the largest reward difference.
    """
    from ummrm.models import load_reward_model
    from ummrm.rewards import score_sequences
    from ummrm.upcycle import upcycle

    model, tokenizer = load_reward_model(str(dense_folder))
    sequences = _check_sequences(tokenizer, data_config, check_pairs)
    before = score_sequences(model, sequences, tokenizer.pad_token_id)
    settings = upcycle(
        model, num_experts=config.num_experts, top_k=config.top_k, shared_rate=config.shared_rate, layers=config.layers,
        router_init_std=config.router_init_std, perturb_fraction=config.perturb_fraction, perturb_noise=config.perturb_noise, seed=config.seed,
    )
    after = score_sequences(model, sequences, tokenizer.pad_token_id)
    difference = max(abs(a - b) for a, b in zip(before, after))
    perturbed = config.perturb_fraction > 0 or config.perturb_noise > 0
    check = {"sequences": len(sequences), "max_reward_difference": difference, "perturbed": perturbed}
    logger.info("upcycle check on %d sequences: largest reward difference %.3g", len(sequences), difference)
    if not perturbed and difference > UPCYCLE_TOLERANCE:
        raise UmmrmError(
            f"the upcycled model's rewards differ from the dense model's by {difference:.3g} (tolerance {UPCYCLE_TOLERANCE}); "
            "this is a bug in ummrm for this model family, please report it with the model name."
        )
    return model, tokenizer, settings, check


def _check_sequences(tokenizer, data_config: DataConfig, pairs: list | None) -> list[list[int]]:
    encoder = make_encoder(tokenizer, data_config)
    if not pairs:
        raise UmmrmError("the upcycle check needs a few preference pairs; give --data.")
    sequences = []
    for pair in pairs[:CHECK_PAIRS]:
        sequences.append(encoder.encode(pair.prompt_messages, pair.prompt_text, pair.chosen, pair.messages_only))
        sequences.append(encoder.encode(pair.prompt_messages, pair.prompt_text, pair.rejected, pair.messages_only))
    return sequences


def train_moe(dense_folder: Path, prepared: PreparedData, data_config: DataConfig, upcycle_config: UpcycleConfig, config: MoEConfig, output: Path, base_settings: dict) -> dict:
    """Upcycle the dense model, then train and save the MoE reward model."""
    model, tokenizer, moe_settings, check = upcycle_model(dense_folder, upcycle_config, prepared.splits["train"], data_config)
    metadata = {"stage": "moe", "settings": base_settings, "moe": moe_settings.to_dict(), "upcycle_check": check}
    summary = train_moe_model(model, tokenizer, prepared, data_config, config, output, metadata)
    return {**summary, "upcycle_check": check}


def train_moe_model(model, tokenizer, prepared: PreparedData, data_config: DataConfig, config: MoEConfig, output: Path, metadata: dict) -> dict:
    """Train an upcycled reward model with Bradley-Terry plus the load-balancing loss, and save it."""
    from ummrm.training import TrainSettings, train_reward_model

    if getattr(model, "moe_settings", None) is None:
        raise UmmrmError("train-moe needs an upcycled model (a folder with moe_config.json); run `ummrm upcycle` first.")
    encoder = make_encoder(tokenizer, data_config)
    skipped = Counter()
    pairs = encode_split(encoder, prepared, "train", skipped)
    settings = TrainSettings(**dataclasses.asdict(config))
    checkpoints = checkpoint_folder(output, metadata["settings"])
    summary = train_reward_model(model, tokenizer.pad_token_id, pairs, checkpoints, settings)
    if summary["is_world_process_zero"]:
        save_stage(model, tokenizer, output, {**metadata, "moe": model.moe_settings.to_dict(), "text": encoder.describe(), "training": summary})
    return summary


def merge(moe_folder: Path, prepared: PreparedData, data_config: DataConfig, config: MergeConfig, output: Path, base_settings: dict) -> dict:
    """Merge an MoE reward model into a dense one with uniform, frequency or learned weights, and save it."""
    from ummrm.merge import MERGE_METHODS, finish_learned_merge, frequency_betas, merge_model, prepare_learned_merge, routing_statistics, uniform_betas
    from ummrm.models import load_reward_model
    from ummrm.rewards import pad_sequences, score_sequences
    from ummrm.training import TrainSettings, train_reward_model

    if config.method not in MERGE_METHODS:
        raise UmmrmError(f"merge method {config.method!r} is invalid; choose one of {', '.join(MERGE_METHODS)}.")
    model, tokenizer = load_reward_model(str(moe_folder))
    encoder = make_encoder(tokenizer, data_config)
    skipped = Counter()

    # routing statistics on training pairs give the frequency weights and the learned merge's start
    statistics_pairs = encode_split(encoder, prepared, "train", skipped)[: config.statistics_pairs]
    batches = (
        pad_sequences([sequence for pair in statistics_pairs[start : start + 8] for sequence in (pair.chosen_ids, pair.rejected_ids)], tokenizer.pad_token_id)
        for start in range(0, len(statistics_pairs), 8)
    )
    statistics = routing_statistics(model, batches)
    record = {"method": config.method, "routing_statistics": {str(k): v.tolist() for k, v in statistics.items()}}

    if config.method == "uniform":
        betas = uniform_betas(model)
    elif config.method == "frequency":
        betas = frequency_betas(statistics)
    else:
        calibration = encode_split(encoder, prepared, "calibration", skipped)
        if not calibration:
            raise UmmrmError("the learned merge needs calibration pairs; raise data.calibration_fraction above 0.")
        prepare_learned_merge(model, frequency_betas(statistics))
        settings = TrainSettings(learning_rate=config.learning_rate, epochs=config.epochs, batch_size=config.batch_size, seed=config.seed, logging_steps=5)
        record["training"] = train_reward_model(model, tokenizer.pad_token_id, calibration, output.with_name(output.name + ".checkpoints"), settings, save_checkpoints=False)
        betas = finish_learned_merge(model)
    if config.method != "learned":
        merge_model(model, betas)
    record["betas"] = {str(k): v.tolist() for k, v in betas.items()}
    logger.info("merged with %s weights: %s", config.method, {k: [round(x, 3) for x in v] for k, v in record["betas"].items()})

    if not is_main_process():
        return record
    check_sequences = [sequence for pair in statistics_pairs[: CHECK_PAIRS // 2] for sequence in (pair.chosen_ids, pair.rejected_ids)]
    before = score_sequences(model, check_sequences, tokenizer.pad_token_id)
    save_stage(model, tokenizer, output, {"stage": "merged", "settings": base_settings, "merge": record, "text": encoder.describe()})
    record["reload_max_difference"] = check_plain_reload(output, check_sequences, before, tokenizer.pad_token_id)
    write_json(output / METADATA_NAME, {**read_metadata(output), "merge": record})
    return record


def check_plain_reload(folder: Path, sequences: list[list[int]], expected: list[float], pad_token_id: int) -> float:
    """Load a merged folder with plain ``AutoModelForSequenceClassification`` and compare its rewards to ``expected``.

    Returns the largest difference; a difference above ``UPCYCLE_TOLERANCE`` is an error.
    """
    from transformers import AutoModelForSequenceClassification

    from ummrm.rewards import pad_sequences

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    input_ids, attention_mask = pad_sequences(sequences, pad_token_id)
    with torch.no_grad():
        # plain transformers pools at the last token that is not the pad token
        rewards = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].tolist()
    difference = max(abs(a - b) for a, b in zip(rewards, expected))
    logger.info("merged folder reloaded with plain transformers: largest reward difference %.3g", difference)
    if difference > UPCYCLE_TOLERANCE:
        raise UmmrmError(f"the merged folder {folder} gives rewards that differ by {difference:.3g} under plain transformers; please report this as a bug.")
    return difference


def evaluate_folder(folder: Path, prepared: PreparedData, data_config: DataConfig, config: EvaluateConfig, split: str = "eval") -> dict:
    """Evaluate a saved reward model on a split; the result is cached in the folder."""
    from ummrm.evaluation import evaluate_reward_model
    from ummrm.models import load_reward_model

    cache = folder / EVALUATION_NAME
    key = {"split": split, "data": dataclasses.asdict(data_config), "evaluate": dataclasses.asdict(config)}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == json.loads(json.dumps(key)):
            return cached["result"]
    model, tokenizer = load_reward_model(str(folder))
    encoder = make_encoder(tokenizer, data_config)
    pairs = encode_split(encoder, prepared, split, Counter())
    result = evaluate_reward_model(model, pairs, tokenizer.pad_token_id, config.batch_size, config.bootstrap_samples, config.seed)
    write_json(cache, {"key": key, "result": result})
    return result


def stage_settings(model_reference: str, data_config: DataConfig, **sections) -> dict:
    settings = {"model": model_reference, "data": dataclasses.asdict(data_config)}
    settings.update({name: dataclasses.asdict(section) for name, section in sections.items()})
    return json.loads(json.dumps(settings, default=str))


# ---------------------------------------------------------------- pipeline

STAGES = ("dense", "moe", "merged")


def run_pipeline(config: PipelineConfig, until: str = "merged") -> dict:
    """Run dense training, upcycling, MoE training, merging and evaluation into ``config.output_dir``.

    ``until`` names the last stage to run (``dense``, ``moe`` or ``merged``); the models made up to it
    are evaluated. Under ``accelerate launch`` every process trains, the first one alone saves and
    evaluates, and the processes wait for each other between stages.
    """
    if until not in STAGES:
        raise UmmrmError(f"until={until!r} is invalid; choose one of {', '.join(STAGES)}.")
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    metrics_path = output / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics.update({"config": config.to_dict(), "versions": library_versions()})
    metrics["seeds"] = {
        "split": config.data.split_seed, "dense": config.dense.seed, "upcycle": config.upcycle.seed,
        "moe": config.moe.seed, "merge": config.merge.seed, "evaluate": config.evaluate.seed,
    }
    metrics.setdefault("stages", {})
    torch.manual_seed(config.dense.seed)

    with measure(metrics["stages"].setdefault("data", {})):
        prepared = prepare_data(config.data)
    metrics["data"] = {
        "source": prepared.data.source, "format": prepared.data.format, "rows": prepared.data.num_rows,
        "pairs": len(prepared.data.pairs), "skipped": dict(prepared.skipped),
        "splits": {name: len(pairs) for name, pairs in prepared.splits.items()},
    }

    dense_settings = stage_settings(config.model, config.data, dense=config.dense)
    moe_settings = stage_settings(config.model, config.data, dense=config.dense, upcycle=config.upcycle, moe=config.moe)
    merge_settings = {**moe_settings, "merge": dataclasses.asdict(config.merge)}
    folders = {name: output / name for name in STAGES[: STAGES.index(until) + 1]}

    stages = [
        ("dense", dense_settings, lambda: train_dense(config.model, prepared, config.data, config.dense, folders["dense"])),
        ("moe", moe_settings, lambda: train_moe(folders["dense"], prepared, config.data, config.upcycle, config.moe, folders["moe"], moe_settings)),
        ("merged", merge_settings, lambda: merge(folders["moe"], prepared, config.data, config.merge, folders["merged"], merge_settings)),
    ]
    for name, settings, run in stages[: len(folders)]:
        if finished(folders[name], settings):
            logger.info("stage %s is complete in %s; not running it again", name, folders[name])
            continue
        logger.info("stage %s: starting", name)
        with measure(metrics["stages"].setdefault(name, {})) as record:
            record["result"] = run()
        wait_for_other_processes()
        if is_main_process():
            write_json(metrics_path, metrics)
    if not is_main_process():
        return {key: value for key, value in metrics.items() if key != "accuracy"}

    # skip counts: the loader's, plus pairs that the tokenizer's truncation made identical, in every split
    from ummrm.models import load_tokenizer

    tokenizer, _ = load_tokenizer(str(folders["dense"]))
    encoder = make_encoder(tokenizer, config.data)
    skipped = Counter(prepared.skipped)
    for split in prepared.splits:
        encode_split(encoder, prepared, split, skipped)
    metrics["skipped"] = dict(skipped)

    metrics["accuracy"] = {}
    for name, folder in folders.items():
        with measure(metrics["stages"].setdefault(f"evaluate_{name}", {})):
            metrics["accuracy"][name] = evaluate_folder(folder, prepared, config.data, config.evaluate)
    write_json(metrics_path, metrics)
    return metrics


def accuracy_table(metrics: dict) -> str:
    """Format the held-out accuracy of each model as a Markdown table."""
    lines = ["| model | accuracy | 95% interval | mean margin | pairs | ties |", "| --- | --- | --- | --- | --- | --- |"]
    for name, result in metrics["accuracy"].items():
        lines.append(
            f"| {name} | {result['accuracy']:.3f} | [{result['ci_low']:.3f}, {result['ci_high']:.3f}] | "
            f"{result['mean_margin']:.3f} | {result['pairs']} | {result['ties']} |"
        )
    return "\n".join(lines)
