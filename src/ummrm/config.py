"""Typed configuration of every stage, read from YAML and overridable from the command line.

Each field's help text is the one source of its documentation: the CLI flags are generated from these
dataclasses, and unknown YAML keys are errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ummrm.errors import UmmrmError


def option(default, help: str):
    """Declare a config field with its help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    source: str = option("Anthropic/hh-rlhf", "preference data: a Hub dataset id, or a local .jsonl/.json/.parquet/.csv file, gzipped or not")
    hub_config: str | None = option(None, "Hub dataset configuration name, if the dataset has several")
    data_dir: str | None = option("harmless-base", "folder inside the Hub dataset to load (hh-rlhf: harmless-base, helpful-base, ...); ignored for local files")
    hub_split: str = option("train", "Hub dataset split to load; ignored for local files")
    max_rows: int | None = option(None, "read at most this many rows of the source (none: all)")
    eval_fraction: float = option(0.2, "fraction of prompts held out for evaluation")
    calibration_fraction: float = option(0.1, "fraction of prompts held out to learn the merge weights")
    split_seed: int = option(0, "seed of the split by prompt")
    max_train_pairs: int | None = option(None, "use at most this many training pairs (none: all)")
    max_eval_pairs: int | None = option(None, "evaluate on at most this many held-out pairs (none: all)")
    max_calibration_pairs: int | None = option(None, "learn merge weights on at most this many calibration pairs (none: all)")
    max_length: int = option(512, "tokens per prompt+response; longer ones lose the start of the prompt, then the middle of the response")
    max_prompt_length: int | None = option(None, "tokens of prompt kept when truncating (none: half of max_length)")
    text_format: str = option("auto", "auto: the model's chat template when it has one, else plain text; chat; plain")


@dataclass
class DenseConfig:
    learning_rate: float = option(1e-5, "peak learning rate (linear decay)")
    epochs: float = option(1.0, "passes over the training pairs")
    batch_size: int = option(8, "pairs per device per step")
    gradient_accumulation_steps: int = option(1, "steps whose gradients add up before one optimiser update")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(0, "optimiser steps of linear learning-rate warm-up")
    center_coef: float = option(0.0, "weight of the reward-centring term mean((r_chosen + r_rejected)^2); 0 turns it off")
    trainable_layers: int = option(-1, "train only the last N transformer blocks plus the final norm and the head; -1 trains everything")
    logging_steps: int = option(10, "log loss, accuracy and margin every N optimiser steps")
    save_steps: int = option(200, "write a checkpoint every N optimiser steps")
    seed: int = option(0, "seed of the head's initialisation, data order and dropout")


@dataclass
class UpcycleConfig:
    num_experts: int = option(4, "routed experts K per upcycled block (the shared expert is extra)")
    top_k: int = option(2, "routed experts chosen per token")
    shared_rate: float = option(0.5, "shared-expert rate alpha in y = alpha*S(h) + (1-alpha)*sum g_i E_i(h)")
    layers: str = option("all", "blocks to upcycle: 'all', 'last:N', or indices like '0,5,7'")
    router_init_std: float = option(0.02, "standard deviation of the router's initial weights (0: a uniform router)")
    perturb_fraction: float = option(0.0, "fraction of each routed expert's hidden units to re-initialise")
    perturb_noise: float = option(0.0, "Gaussian noise added to routed experts, relative to each weight's standard deviation")
    seed: int = option(0, "seed of the router initialisation and the perturbation")


@dataclass
class MoEConfig(DenseConfig):
    router_aux_loss_coef: float = option(0.01, "weight lambda_aux of the load-balancing loss")
    collapse_threshold: float = option(0.95, "warn when a block's top-k experts take at least this share of routed slots")


@dataclass
class MergeConfig:
    method: str = option("learned", "learned: routing frequencies refined on the calibration split; frequency; uniform")
    learning_rate: float = option(0.05, "learning rate of the merge logits (learned merge)")
    epochs: float = option(1.0, "passes over the calibration pairs (learned merge)")
    batch_size: int = option(8, "pairs per step (learned merge)")
    statistics_pairs: int = option(256, "training pairs whose routing gives the frequencies")
    seed: int = option(0, "seed of the learned merge's data order")


@dataclass
class EvaluateConfig:
    batch_size: int = option(16, "sequences per forward pass")
    bootstrap_samples: int = option(1000, "bootstrap resamples of the 95% accuracy interval")
    seed: int = option(0, "seed of the bootstrap")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "dense": DenseConfig,
    "upcycle": UpcycleConfig,
    "moe": MoEConfig,
    "merge": MergeConfig,
    "evaluate": EvaluateConfig,
}


@dataclass
class PipelineConfig:
    model: str = option("smollm2-135m-instruct", "base model: a Hub id, a local folder, a .gguf file or the alias smollm2-135m-instruct")
    output_dir: str = option("runs/pipeline", "folder that receives dense/, moe/, merged/ and metrics.json")
    data: DataConfig = field(default_factory=DataConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _base_type(annotation) -> tuple[type, bool]:
    """Return (scalar type, optional) of an annotation like ``int | None``."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        non_none = [arg for arg in args if arg is not type(None)]
        return non_none[0], True
    return annotation, False


def convert_value(value, annotation, name: str):
    """Convert a YAML or command-line value to the field's type, with an error naming the field."""
    kind, optional = _base_type(annotation)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise UmmrmError(f"{name} must not be empty; give a value of type {kind.__name__}.")
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if kind is str and isinstance(value, (list, tuple)):
            return ",".join(str(item) for item in value)
        return kind(value)
    except (TypeError, ValueError):
        raise UmmrmError(f"{name}={value!r} is invalid: expected type {kind.__name__}.") from None


def section_from_dict(cls, values: dict, prefix: str):
    """Build a section dataclass from a mapping; unknown keys are errors."""
    if not isinstance(values, dict):
        raise UmmrmError(f"{prefix} must be a mapping of settings, got {type(values).__name__}.")
    known = {item.name for item in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UmmrmError(f"unknown setting(s) {', '.join(prefix + '.' + key for key in unknown)}; known settings of {prefix}: {', '.join(sorted(known))}.")
    hints = _field_types(cls)
    return cls(**{key: convert_value(value, hints[key], f"{prefix}.{key}") for key, value in values.items()})


def read_config_file(path: str | Path, presets: str) -> dict:
    """Read a YAML config file into a mapping; a missing file or invalid YAML is an error naming ``presets``."""
    path = Path(path)
    if not path.is_file():
        raise UmmrmError(f"config file {path} not found; the presets are {presets} in the ummrm repository.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UmmrmError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise UmmrmError(f"config file {path} must contain a mapping at the top level.")
    return raw


def apply_config_mapping(config, raw: dict, sections: dict[str, type], top_level: tuple[str, ...], described: str):
    """Set the top-level strings and the sections of ``config`` from a mapping; unknown keys are errors."""
    known = set(top_level) | set(sections)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UmmrmError(f"unknown key(s) {', '.join(unknown)} in {described}; known keys: {', '.join(sorted(known))}.")
    for key in set(top_level) & set(raw):
        setattr(config, key, convert_value(raw[key], str, key))
    for name, cls in sections.items():
        if name in raw:
            setattr(config, name, section_from_dict(cls, raw[name] or {}, name))
    return config


def load_pipeline_config(path: str | Path | None) -> PipelineConfig:
    """Read a YAML pipeline config; a missing file or an unknown key is an error."""
    if path is None:
        return PipelineConfig()
    raw = read_config_file(path, "configs/quickstart.yaml and configs/smoke.yaml")
    return apply_config_mapping(PipelineConfig(), raw, SECTIONS, ("model", "output_dir"), str(path))


def add_section_arguments(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    """Add one flag per field of ``cls``: ``--name`` or, with a prefix, ``--prefix.name`` (dashes for underscores)."""
    group = parser.add_argument_group(prefix or cls.__name__.removesuffix("Config").lower())
    for item in dataclasses.fields(cls):
        flag = "--" + (f"{prefix}." if prefix else "") + item.name.replace("_", "-")
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        group.add_argument(flag, dest=_dest(prefix, item.name), default=None, metavar=_metavar(item.type),
                           # argparse expands %-formats in help text, so a literal % (as in "95%") is doubled
                           help=f"{item.metadata.get('help', '')} (default: {default})".replace("%", "%%"))


def _metavar(annotation) -> str:
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return name.split("|")[0].strip().upper()


def _dest(prefix: str, name: str) -> str:
    return f"{prefix}__{name}" if prefix else name


def apply_section_arguments(section, arguments: argparse.Namespace, prefix: str = ""):
    """Overwrite the fields of a section dataclass with the flags given on the command line."""
    hints = _field_types(type(section))
    for item in dataclasses.fields(section):
        value = getattr(arguments, _dest(prefix, item.name), None)
        if value is not None:
            flag = "--" + (f"{prefix}." if prefix else "") + item.name.replace("_", "-")
            setattr(section, item.name, convert_value(value, hints[item.name], flag))
    return section
