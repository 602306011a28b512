"""RL against a proxy reward model, with the gold reward model's score tracked at every step.

This is the RL half of the synthetic-gold over-optimisation protocol: a policy is optimised against a
proxy reward model (or an ensemble of them) with a KL penalty towards the initial policy. A gold reward
model, standing in for people, scores the same completions without entering the loss. Plotting gold and
proxy score against the KL shows when the proxy starts to be hacked.

Trainer: TRL's ``RLOOTrainer`` (TRL 1.16), chosen over ``GRPOTrainer`` and the experimental PPO trainer:

- RLOO puts the KL penalty into the reward, ``r(x, y) - beta * KL(x, y)``, with ``KL(x, y)`` the summed
  log-ratio ``sum_t log pi(y_t | ...) - log pi_ref(y_t | ...)`` of the sampled sequence. That is the
  classic KL-regularised RLHF objective, so ``beta`` is in the proxy's reward units and the KL on the
  plots is the one the penalty acts on. GRPO instead adds a per-token KL to the loss and divides
  advantages by each group's reward standard deviation.
- RLOO needs no value model. A step costs one generation, no-grad forward passes of the policy, the
  reference and each reward model, and one forward and backward pass of the policy, which a CPU can
  afford for a 135M policy. PPO would add a value model and its loss.

Every reward function is computed and logged at every step whatever its weight (TRL 1.16
``RLOOTrainer._calculate_rewards`` calls all of them, and ``_generate_and_score_completions`` logs
``rewards/<name>/mean`` per function before weighting). The gold function gets weight 0, so only the
proxy enters the loss.

KL columns of ``rl.csv``, both from the temperature-scaled policy and reference distributions on the
sampled completions (the policy at sampling time, before that step's update):

- ``kl_per_token``: TRL's logged ``kl``, the mean of ``log pi - log pi_ref`` over all completion tokens
  of the batch. This is the k1 estimator, so a batch mean can be slightly negative.
- ``kl_per_sequence``: the mean over completions of the summed log-ratio, the per-sequence KL estimate
  that enters the reward. It equals ``kl_per_token`` times the batch's completion tokens over its
  completion count, computed per generation batch.

Both are Monte Carlo estimates of ``KL(pi || pi_ref)`` only when completions are sampled from the
tempered policy itself, so ``top_p`` below 1 makes them biased, and ``run_rl`` logs a warning then.

Each training step samples only ``batch_size / num_generations`` prompts, so its mean scores move
with which prompts it drew as much as with the policy. With ``prompts.eval_prompts`` set, a fixed set of
held-out prompts, disjoint from the training ones, is scored before the first step and every
``train.eval_steps`` steps through TRL's evaluation loop (fresh samples from the current policy, the same
rewards and KL). Those rows go to ``rl-eval.csv``, and the plot draws its line through them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path


from ummrm.config import add_section_arguments, apply_config_mapping, apply_section_arguments, convert_value, option, read_config_file
from ummrm.prompts import PromptSourceConfig
from ummrm.errors import UmmrmError

logger = logging.getLogger(__name__)

CSV_NAME = "rl.csv"
EVAL_CSV_NAME = "rl-eval.csv"
# the evaluation before the first step, kept apart because Trainer.train starts a fresh log history
EVAL_START_NAME = "rl-eval-start.json"
RUN_NAME = "run.json"
PLOT_NAME = "rl.png"
POLICY_FOLDER = "policy"
PROXY_NAME = "proxy"
GOLD_NAME = "gold"
CHECKPOINT_PREFIX = "checkpoint-"
# written last into a Trainer checkpoint, so a checkpoint without it was interrupted while being saved
CHECKPOINT_STATE_NAME = "trainer_state.json"

# rl.csv column -> key of TRL's logged metrics (RLOOTrainer.log averages each over the logging window)
CSV_COLUMNS = {
    "step": "step",
    "kl_per_sequence": "kl_per_sequence",
    "kl_per_token": "kl",
    "proxy_mean": f"rewards/{PROXY_NAME}/mean",
    "gold_mean": f"rewards/{GOLD_NAME}/mean",
    "proxy_std": f"rewards/{PROXY_NAME}/std",
    "gold_std": f"rewards/{GOLD_NAME}/std",
    "completion_length": "completions/mean_length",
    "clipped_ratio": "completions/clipped_ratio",
    "entropy": "entropy",
    "loss": "loss",
    "learning_rate": "learning_rate",
    "step_time": "step_time",
}
# rl-eval.csv column -> key of TRL's logged evaluation metrics (prefixed with eval_ by RLOOTrainer.log)
EVAL_CSV_COLUMNS = {
    "step": "step",
    "kl_per_sequence": "eval_kl_per_sequence",
    "kl_per_token": "eval_kl",
    "proxy_mean": f"eval_rewards/{PROXY_NAME}/mean",
    "gold_mean": f"eval_rewards/{GOLD_NAME}/mean",
    "proxy_std": f"eval_rewards/{PROXY_NAME}/std",
    "gold_std": f"eval_rewards/{GOLD_NAME}/std",
    "completion_length": "eval_completions/mean_length",
    "clipped_ratio": "eval_completions/clipped_ratio",
}
MEMBER_METRIC_PREFIX = "proxy_member_"
KL_DESCRIPTION = (
    "kl_per_token: mean over completion tokens of log pi - log pi_ref (TRL's kl); "
    "kl_per_sequence: mean over completions of the summed log-ratio; both from the temperature-scaled distributions"
)
# steps averaged per point of a plot's line; a run with fewer than 10 times this many rows averages a tenth of them
MAX_SMOOTHING_WINDOW = 10


# ---------------------------------------------------------------- configuration

@dataclass
class ProxyConfig:
    models: str = option("", "proxy reward model(s) the policy is optimised against: one folder, or several separated by commas for an ensemble")
    objective: str = option("mean", "how an ensemble's rewards combine: mean; worst (minimum over members); uncertainty (mean - uncertainty_weight * population variance)")
    uncertainty_weight: float = option(0.5, "weight of the members' variance in the uncertainty objective")


@dataclass
class RewardTextConfig:
    text_format: str | None = option(None, "how prompt and completion become reward-model text: auto, chat or plain (none: what each reward model's ummrm.json records, else auto)")
    max_length: int | None = option(None, "tokens per prompt+completion for the reward models (none: what each reward model's ummrm.json records, else 512)")
    max_prompt_length: int | None = option(None, "prompt tokens kept when truncating for the reward models (none: as recorded, else half of max_length)")
    batch_size: int = option(16, "sequences per reward-model forward pass")


@dataclass
class PromptsConfig(PromptSourceConfig):
    max_prompts: int | None = option(512, "train on at most this many distinct prompts, drawn after shuffling with seed (none: all)")
    max_prompt_length: int = option(256, "skip prompts longer than this many policy tokens (chat template included)")
    seed: int = option(0, "seed of the prompt shuffle")
    eval_prompts: int = option(0, "hold out this many prompts, disjoint from the training ones, and score the policy on them before the first step and every train.eval_steps steps (0: no evaluation)")


@dataclass
class RLTrainConfig:
    learning_rate: float = option(1e-5, "peak learning rate of the policy (linear decay to 0 over max_steps)")
    max_steps: int = option(100, "optimiser steps")
    batch_size: int = option(8, "completions per optimiser step: prompts per step times num_generations")
    num_generations: int = option(4, "completions sampled per prompt; RLOO's leave-one-out baseline needs at least 2")
    max_completion_length: int = option(64, "maximum new tokens per completion")
    temperature: float = option(1.0, "sampling temperature; the KL is measured between the temperature-scaled policy and reference")
    top_p: float = option(1.0, "nucleus sampling threshold; below 1 the logged KL is a biased estimate")
    beta: float = option(0.05, "KL coefficient: the reward is proxy - beta * (summed log-ratio to the initial policy)")
    normalize_advantages: bool = option(False, "scale each batch's advantages to mean 0 and standard deviation 1")
    logging_steps: int = option(1, "write a row of rl.csv every N optimiser steps (metrics averaged over them)")
    save_steps: int = option(25, "write a checkpoint every N optimiser steps")
    eval_steps: int = option(10, "score the held-out prompts (prompts.eval_prompts) every N optimiser steps")
    eval_generations: int = option(2, "completions sampled per held-out prompt at each evaluation")
    seed: int = option(0, "seed of sampling, data order and initialisation")
    bf16: bool = option(False, "train in bfloat16 mixed precision (GPUs that support it); false trains in fp32")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: less memory, slower steps (TRL's own default is on)")


SECTIONS: dict[str, type] = {
    "proxy": ProxyConfig,
    "reward": RewardTextConfig,
    "prompts": PromptsConfig,
    "train": RLTrainConfig,
}


@dataclass
class RLConfig:
    policy: str = option("smollm2-135m-instruct", "initial policy and KL reference: a causal LM as a Hub id, a local folder, a .gguf file or the alias smollm2-135m-instruct")
    gold: str = option("", "gold reward model folder, scored and logged at every step with weight 0, so its score never enters the reward")
    output_dir: str = option("runs/rl", "folder that receives rl.csv, run.json, rl.png and the trained policy")
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    reward: RewardTextConfig = field(default_factory=RewardTextConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    train: RLTrainConfig = field(default_factory=RLTrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def proxy_models(self) -> list[str]:
        return [reference.strip() for reference in self.proxy.models.split(",") if reference.strip()]


TOP_LEVEL = ("policy", "gold", "output_dir")


def load_rl_config(path: str | Path | None) -> RLConfig:
    """Read a YAML RL config; a missing file, an unknown key or a value of the wrong type is an error."""
    if path is None:
        return RLConfig()
    raw = read_config_file(path, "configs/rl-smoke.yaml and configs/rl-cpu.yaml")
    return config_from_dict(raw, str(path))


def config_from_dict(raw: dict, described: str = "the config") -> RLConfig:
    """Build an RLConfig from a mapping such as a parsed YAML file; unknown keys are errors."""
    return apply_config_mapping(RLConfig(), raw, SECTIONS, TOP_LEVEL, described)


def check_config(config: RLConfig) -> None:
    """Raise UmmrmError for settings that would fail or mislead later, naming the setting and the fix."""
    from ummrm.ensemble import check_objective

    if not config.proxy_models:
        raise UmmrmError("proxy.models is missing: give the proxy reward model folder(s), e.g. --proxy runs/overopt-cpu/proxies/dense.")
    if not config.gold.strip():
        raise UmmrmError("gold is missing: give the gold reward model folder, e.g. --gold runs/overopt-cpu/gold.")
    check_objective(config.proxy.objective, config.proxy.uncertainty_weight)
    for name, reference in [("proxy.models", reference) for reference in config.proxy_models] + [("gold", config.gold)]:
        check_local_reference(name, reference)
    train = config.train
    if train.num_generations < 2:
        raise UmmrmError(f"train.num_generations={train.num_generations} is invalid: RLOO's leave-one-out baseline needs at least 2 completions per prompt.")
    if train.batch_size < 1 or train.batch_size % train.num_generations:
        raise UmmrmError(
            f"train.batch_size={train.batch_size} is invalid: it must be a positive multiple of train.num_generations={train.num_generations}, "
            "because every prompt's completions go into one batch."
        )
    if train.beta <= 0:
        raise UmmrmError(
            f"train.beta={train.beta} is invalid: the KL to the initial policy is measured with TRL's reference model, which it "
            "loads only for beta > 0. Use a small value such as 1e-4 to optimise with almost no KL penalty."
        )
    positive = {"train.max_steps": train.max_steps, "train.max_completion_length": train.max_completion_length,
                "train.logging_steps": train.logging_steps, "train.save_steps": train.save_steps,
                "train.eval_steps": train.eval_steps, "train.eval_generations": train.eval_generations,
                "train.learning_rate": train.learning_rate, "train.temperature": train.temperature,
                "reward.batch_size": config.reward.batch_size, "prompts.max_prompt_length": config.prompts.max_prompt_length}
    for name, value in positive.items():
        if value <= 0:
            raise UmmrmError(f"{name}={value} is invalid: it must be greater than 0.")
    if not 0 < train.top_p <= 1:
        raise UmmrmError(f"train.top_p={train.top_p} is invalid: it must be in (0, 1].")
    if config.prompts.max_prompts is not None and config.prompts.max_prompts < 1:
        raise UmmrmError(f"prompts.max_prompts={config.prompts.max_prompts} is invalid: use at least 1, or none for all.")
    if config.prompts.eval_prompts < 0:
        raise UmmrmError(f"prompts.eval_prompts={config.prompts.eval_prompts} is invalid: use 0 for no evaluation, or a number of prompts.")


def check_local_reference(name: str, reference: str) -> None:
    """Raise UmmrmError when a reward model reference names a local folder that does not exist.

    A Hub id has the form ``owner/name``, so a reference with more slashes, or one that starts with
    ``.``, ``/`` or ``~``, can only be a local folder.
    """
    if Path(reference).expanduser().is_dir():
        return
    if reference.count("/") > 1 or reference.startswith((".", "/", "~")):
        raise UmmrmError(
            f"{name}: reward model folder {reference} not found. The presets expect the folders written by "
            "`ummrm overopt --config configs/overopt-cpu.yaml` (or overopt-smoke.yaml); run it first, or give another folder."
        )


def add_rl_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``ummrm rl``: the config file, one flag per config field, and the short forms."""
    parser.add_argument("--config", default=None, help="YAML config (see configs/rl-*.yaml); flags below override it")
    parser.add_argument("--plot-only", metavar="FOLDER", default=None,
                        help="train nothing: plot gold and proxy score against KL for every run (rl.csv) under FOLDER")
    parser.add_argument("--plot-output", metavar="PNG", default=None, help=f"file the plot is written to (default: FOLDER/{PLOT_NAME})")
    for name in TOP_LEVEL:
        item = RLConfig.__dataclass_fields__[name]
        flags = ["--" + name.replace("_", "-")] + (["--output"] if name == "output_dir" else [])
        parser.add_argument(*flags, dest=name, default=None, help=f"{item.metadata['help']} (overrides the config)")
    # short forms of the settings changed most often between runs
    parser.add_argument("--proxy", dest="proxy__models", metavar="FOLDERS", default=None, help="same as --proxy.models")
    parser.add_argument("--prompts", dest="prompts__source", metavar="SOURCE", default=None, help="same as --prompts.source")
    for name, cls in SECTIONS.items():
        add_section_arguments(parser, cls, name)


def config_from_arguments(arguments: argparse.Namespace) -> RLConfig:
    """Load ``--config`` and apply the command-line flags over it."""
    config = load_rl_config(arguments.config)
    for name in TOP_LEVEL:
        value = getattr(arguments, name, None)
        if value is not None:
            setattr(config, name, convert_value(value, str, "--" + name.replace("_", "-")))
    for name in SECTIONS:
        apply_section_arguments(getattr(config, name), arguments, name)
    return config


# ---------------------------------------------------------------- reward functions

def completion_text(completion) -> str:
    """Return the text of a TRL completion: a string, or a list of assistant messages (conversational)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and all(isinstance(message, dict) for message in completion):
        return "".join(str(message.get("content", "")) for message in completion)
    raise UmmrmError(f"a completion must be a string or a list of messages; got {type(completion).__name__}.")


def recorded_text_settings(reference: str) -> dict:
    """Return the text settings (text_format, max_length, max_prompt_length) recorded in a model folder's ummrm.json."""
    path = Path(reference) / "ummrm.json"
    if not path.is_file():
        return {}
    try:
        recorded = json.loads(path.read_text()).get("text") or {}
    except (json.JSONDecodeError, AttributeError):
        logger.warning("%s is not a valid ummrm.json; using the default text settings for %s", path, reference)
        return {}
    return {key: recorded[key] for key in ("text_format", "max_length", "max_prompt_length") if recorded.get(key) is not None}


def text_settings(text: RewardTextConfig, recorded: dict) -> dict:
    """Return the RewardEncoder settings of one reward model: the config's values, else the recorded ones, else defaults."""
    if text.max_prompt_length is not None:
        max_prompt_length = text.max_prompt_length
    elif text.max_length is not None:
        # a recorded prompt limit belongs to the recorded max_length, not to the one given here
        max_prompt_length = None
    else:
        max_prompt_length = recorded.get("max_prompt_length")
    return {
        "text_format": text.text_format or recorded.get("text_format", "auto"),
        "max_length": text.max_length or recorded.get("max_length", 512),
        "max_prompt_length": max_prompt_length,
    }


class RewardModelFunction:
    """A TRL reward function that scores completions with one ummrm reward model or an ensemble of them.

    TRL calls it with the prompts and completions as text (chat messages for conversational data). Each
    reward model re-encodes prompt and completion with its own tokenizer and chat template through
    ``RewardEncoder``, exactly as ``ummrm score`` does, so no token id crosses from the policy's
    tokenizer to a reward model. With several models, the members' rewards are combined per completion
    by ``ummrm.ensemble.combine_rewards`` and each member's mean is logged as ``proxy_member_<i>``.

    It is deliberately not an ``nn.Module``: TRL would then tokenize with the reward model's tokenizer
    itself and read the reward through the model's own pooling.
    """

    def __init__(self, references: list[str], name: str, objective: str = "mean", uncertainty_weight: float = 0.5,
                 text: RewardTextConfig | None = None, models: list | None = None):
        """Load the reward models of ``references``, or use ``models``: (model, tokenizer) pairs already loaded."""
        from ummrm.ensemble import check_objective
        from ummrm.models import load_reward_model
        from ummrm.rewards import RewardEncoder

        if not references:
            raise UmmrmError(f"the {name} reward function needs at least one reward model.")
        check_objective(objective, uncertainty_weight)
        text = text or RewardTextConfig()
        self.__name__ = name  # TRL names the logged metrics rewards/<__name__>/mean
        self.references = list(references)
        self.objective = objective
        self.uncertainty_weight = uncertainty_weight
        self.batch_size = text.batch_size
        self.models, self.encoders = [], []
        for index, reference in enumerate(self.references):
            if models is not None:
                model, tokenizer = models[index]
            else:
                model, tokenizer = load_reward_model(reference)
            settings = text_settings(text, recorded_text_settings(reference))
            self.models.append(model.eval())
            self.encoders.append(RewardEncoder(tokenizer, **settings))
            logger.info("%s reward model %s: %s", name, reference, settings)

    def to(self, device) -> "RewardModelFunction":
        """Move every reward model to ``device`` (the policy's), and return self."""
        for model in self.models:
            model.to(device)
        return self

    def describe(self) -> dict:
        """Return what the run records about this function: its models, objective and text settings."""
        return {
            "models": self.references,
            "objective": self.objective if len(self.models) > 1 else None,
            "uncertainty_weight": self.uncertainty_weight if self.objective == "uncertainty" and len(self.models) > 1 else None,
            "text": [{key: value for key, value in encoder.describe().items() if key != "chat_template"} for encoder in self.encoders],
        }

    def member_rewards(self, prompts: list, completions: list):
        """Return the rewards of every member, a float64 tensor of shape (members, completions)."""
        import torch

        from ummrm.rewards import score_sequences
        from ummrm.scoring import prompt_forms

        if len(prompts) != len(completions):
            raise UmmrmError(f"got {len(prompts)} prompts but {len(completions)} completions; they must pair up one to one.")
        rewards = []
        for model, encoder in zip(self.models, self.encoders):
            sequences = []
            for index, (prompt, completion) in enumerate(zip(prompts, completions)):
                messages, prompt_text, messages_only = prompt_forms(prompt, index)
                sequences.append(encoder.encode(messages, prompt_text, completion_text(completion), messages_only))
            rewards.append(score_sequences(model, sequences, encoder.pad_token_id, self.batch_size))
        return torch.tensor(rewards, dtype=torch.float64)

    def __call__(self, prompts: list, completions: list, log_metric=None, **kwargs) -> list[float]:
        from ummrm.ensemble import combine_rewards

        members = self.member_rewards(prompts, completions)
        if len(self.models) > 1 and log_metric is not None:
            for index, values in enumerate(members):
                log_metric(f"{MEMBER_METRIC_PREFIX}{index}", values.mean().item())
        return combine_rewards(members, self.objective, self.uncertainty_weight).tolist()


# ---------------------------------------------------------------- prompts

def prepare_prompts(config: PromptsConfig, tokenizer) -> tuple[list[list[dict]], list[list[dict]]]:
    """Load, shuffle and filter the prompts; return the training and held-out ones as TRL conversational prompts.

    After the shuffle, the first ``eval_prompts`` prompts that fit are held out and the next
    ``max_prompts`` train, so the two sets never share a prompt.
    """
    from ummrm.prompts import load_prompts

    if not getattr(tokenizer, "chat_template", None):
        raise UmmrmError(
            "the policy's tokenizer has no chat template, but the prompts are chat messages; "
            "use a chat or instruct model as the policy, such as smollm2-135m-instruct."
        )
    hub_options = {"hub_config": config.hub_config, "data_dir": config.data_dir, "hub_split": config.hub_split}
    if Path(config.source).expanduser().is_file():
        # a preset names Hub options for its default source; they do not apply to a local file
        hub_options = {}
    prompts = load_prompts(config.source, max_rows=config.max_rows, **hub_options)
    order = sorted(prompts, key=lambda prompt: prompt.key)
    random.Random(config.seed).shuffle(order)

    held_out, selected, too_long = [], [], 0
    for prompt in order:
        if config.max_prompts is not None and len(selected) >= config.max_prompts:
            break
        messages = prompt.to_json()
        length = len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False))
        if length > config.max_prompt_length:
            too_long += 1
            continue
        (held_out if len(held_out) < config.eval_prompts else selected).append(messages)
    logger.info(
        "training on %d prompts, holding out %d for evaluation; skipped %d longer than %d policy tokens",
        len(selected), len(held_out), too_long, config.max_prompt_length,
    )
    if not selected:
        raise UmmrmError(
            f"no prompt of {config.source} fits in prompts.max_prompt_length={config.max_prompt_length} policy tokens "
            f"({too_long} were longer); raise the limit."
            + (f" {len(held_out)} prompts were held out for evaluation (prompts.eval_prompts)." if held_out else "")
        )
    return selected, held_out


# ---------------------------------------------------------------- training

def _trainer_class():
    """Return RLOOTrainer extended with the per-sequence KL metric (imported lazily: TRL is heavy)."""
    import torch
    from trl import RLOOTrainer

    class SequenceKLRLOOTrainer(RLOOTrainer):
        """RLOOTrainer that also logs ``kl_per_sequence``, the mean summed log-ratio of a batch's completions."""

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            mode = "train" if self.model.training else "eval"
            token_kl = self._metrics[mode].get("kl")
            if self.beta != 0.0 and token_kl:
                # TRL's kl is the log-ratio summed over all completion tokens (of all processes) divided by
                # their count, so scaling it by tokens / completions gives the mean summed log-ratio per completion
                mask = output["completion_mask"]
                counts = torch.stack([mask.sum().float(), torch.tensor(float(mask.shape[0]), device=mask.device)])
                tokens, completions = self.accelerator.reduce(counts, reduction="sum").tolist()
                self._metrics[mode]["kl_per_sequence"].append(token_kl[-1] * tokens / max(completions, 1.0))
            return output

    return SequenceKLRLOOTrainer


def _csv_callback(output: Path, member_count: int, evaluating: bool):
    from transformers import TrainerCallback

    class CSVLogCallback(TrainerCallback):
        """Rewrites rl.csv, and rl-eval.csv when evaluating, from the Trainer's log history at every log.

        A resumed run's log history has only the rows its checkpoint restored, so the CSVs keep only those.
        """

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero:
                write_csvs(output, state.log_history, member_count, evaluating)

    return CSVLogCallback()


def write_csvs(output: Path, log_history: list[dict], member_count: int, evaluating: bool) -> int:
    """Write rl.csv and, when evaluating, rl-eval.csv (the start evaluation first); return rl.csv's row count."""
    if evaluating:
        start_path = output / EVAL_START_NAME
        start = [json.loads(start_path.read_text())] if start_path.is_file() else []
        write_csv(output / EVAL_CSV_NAME, start + log_history, member_count, EVAL_CSV_COLUMNS, "eval_")
    return write_csv(output / CSV_NAME, log_history, member_count)


def write_csv(path: Path, log_history: list[dict], member_count: int = 0, columns: dict | None = None, prefix: str = "") -> int:
    """Write one row per log entry of ``log_history`` that has ``columns``' scores to ``path`` (atomically); return the row count.

    ``columns`` maps CSV columns to logged keys (default ``CSV_COLUMNS``, the training rows);
    ``prefix`` is the one TRL puts before the member metrics' names (``eval_`` for evaluation rows).
    """
    columns = dict(columns or CSV_COLUMNS)
    proxy_key = columns["proxy_mean"]
    if member_count > 1:
        columns.update({f"proxy_member_{index}_mean": f"{prefix}{MEMBER_METRIC_PREFIX}{index}" for index in range(member_count)})
    rows = [entry for entry in log_history if proxy_key in entry]
    staging = path.with_name(path.name + ".partial")
    with staging.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for entry in rows:
            writer.writerow(["" if entry.get(key) is None else entry[key] for key in columns.values()])
    staging.replace(path)
    return len(rows)


def run_settings(config: RLConfig) -> dict:
    """Return the settings that decide a run's result; a resumed or finished run must have the same ones."""
    settings = config.to_dict()
    settings.pop("output_dir")
    return json.loads(json.dumps(settings))


def complete_checkpoint(folder: Path) -> Path | None:
    """Return the newest complete Trainer checkpoint in ``folder``, deleting any left half written by a crash."""
    complete = []
    for checkpoint in folder.glob(f"{CHECKPOINT_PREFIX}*"):
        if not checkpoint.is_dir() or not checkpoint.name.removeprefix(CHECKPOINT_PREFIX).isdigit():
            continue
        if (checkpoint / CHECKPOINT_STATE_NAME).is_file():
            complete.append(checkpoint)
        else:
            logger.warning("removing %s: it has no %s, so saving it was interrupted", checkpoint, CHECKPOINT_STATE_NAME)
            # every process of a distributed launch gets here, so another one may have removed it already
            shutil.rmtree(checkpoint, ignore_errors=True)
    return max(complete, key=lambda path: int(path.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def versions() -> dict:
    import importlib.metadata

    from ummrm.pipeline import library_versions

    found = library_versions()
    try:
        found["trl"] = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        found["trl"] = None
    return found


def trainer_arguments(config: RLConfig, checkpoints: Path):
    """Return the RLOOConfig of a run: the ummrm settings plus fixed reward weights, checkpointing and logging choices."""
    from trl import RLOOConfig

    train = config.train
    return RLOOConfig(
        output_dir=str(checkpoints),
        learning_rate=train.learning_rate,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        num_generations=train.num_generations,
        max_completion_length=train.max_completion_length,
        temperature=train.temperature,
        top_p=train.top_p,
        beta=train.beta,
        normalize_advantages=train.normalize_advantages,
        # the gold function is scored and logged at every step, but weight 0 keeps it out of the reward
        reward_weights=[1.0, 0.0],
        logging_steps=train.logging_steps,
        **evaluation_arguments(config),
        save_strategy="steps",
        save_steps=train.save_steps,
        # the previous checkpoint is deleted only after the next one is complete
        save_total_limit=2,
        seed=train.seed,
        bf16=train.bf16,
        gradient_checkpointing=train.gradient_checkpointing,
        # dropout would make the logged log-ratio differ from the one of the policy that sampled
        disable_dropout=True,
        model_init_kwargs={"dtype": "float32"},
        report_to="none",
        log_completions=False,
    )


def evaluation_arguments(config: RLConfig) -> dict:
    """Return the RLOOConfig settings of the held-out evaluation: none when prompts.eval_prompts is 0."""
    train = config.train
    if not config.prompts.eval_prompts:
        return {"eval_strategy": "no"}
    # TRL needs the eval batch to hold whole prompt groups of num_generations_eval completions
    batch_size = train.eval_generations * max(1, train.batch_size // train.eval_generations)
    return {
        "eval_strategy": "steps",
        "eval_steps": train.eval_steps,
        "num_generations_eval": train.eval_generations,
        "per_device_eval_batch_size": batch_size,
    }


def run_rl(config: RLConfig) -> dict:
    """Optimise ``config.policy`` against the proxy with RLOO, logging gold and proxy scores and the KL.

    Writes ``rl.csv``, ``run.json``, ``rl.png`` and the trained policy into ``config.output_dir``, and
    ``rl-eval.csv`` when ``prompts.eval_prompts`` holds prompts out. An
    interrupted run with the same settings resumes from its last complete checkpoint. A finished run
    with the same settings is not repeated, and one with other settings is an error. Returns the
    contents of run.json.
    """
    from transformers import AutoTokenizer

    from ummrm.models import resolve_model
    from ummrm.pipeline import checkpoint_folder, finished, is_main_process, write_json

    check_config(config)
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    settings = run_settings(config)
    policy_folder = output / POLICY_FOLDER
    if finished(policy_folder, settings):
        logger.info("the run in %s is complete with these settings; not training again", output)
        record_path = output / RUN_NAME
        return json.loads(record_path.read_text()) if record_path.is_file() else {"status": "complete", "config": config.to_dict()}
    if config.train.top_p < 1:
        logger.warning("train.top_p=%s < 1: completions are not sampled from the policy itself, so the logged KL is a biased estimate", config.train.top_p)

    # load the reward models first, so that a wrong folder fails before the policy is loaded
    proxy = RewardModelFunction(config.proxy_models, PROXY_NAME, config.proxy.objective, config.proxy.uncertainty_weight, config.reward)
    gold = RewardModelFunction([config.gold], GOLD_NAME, text=config.reward)
    policy = resolve_model(config.policy)
    tokenizer = AutoTokenizer.from_pretrained(policy, padding_side="left")
    prompts, held_out = prepare_prompts(config.prompts, tokenizer)

    from datasets import Dataset

    checkpoints = checkpoint_folder(policy_folder, settings)
    resume = complete_checkpoint(checkpoints)
    record = {
        "status": "running", "config": config.to_dict(), "seed": config.train.seed, "versions": versions(),
        "trainer": "trl.RLOOTrainer", "policy_resolved": policy, "prompts": len(prompts), "eval_prompts": len(held_out),
        "reward_functions": {PROXY_NAME: proxy.describe(), GOLD_NAME: gold.describe()},
        "reward_weights": {PROXY_NAME: 1.0, GOLD_NAME: 0.0}, "kl": KL_DESCRIPTION,
        "resumed_from": str(resume) if resume else None,
    }
    if is_main_process():
        write_json(output / RUN_NAME, record)

    trainer = _trainer_class()(
        model=policy,
        reward_funcs=[proxy, gold],
        args=trainer_arguments(config, checkpoints),
        train_dataset=Dataset.from_list([{"prompt": messages} for messages in prompts]),
        eval_dataset=Dataset.from_list([{"prompt": messages} for messages in held_out]) if held_out else None,
        processing_class=tokenizer,
        callbacks=[_csv_callback(output, len(config.proxy_models), bool(held_out))],
    )
    proxy.to(trainer.accelerator.device)
    gold.to(trainer.accelerator.device)

    start = time.perf_counter()
    if resume:
        logger.info("resuming from %s", resume)
    elif held_out:
        _evaluate_start(trainer, output)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - start
    if not trainer.is_world_process_zero():
        return record

    rows = write_csvs(output, trainer.state.log_history, len(config.proxy_models), bool(held_out))
    _save_policy(trainer, policy_folder, settings)
    record.update({
        "status": "complete", "seconds": round(seconds, 1), "steps": trainer.state.global_step,
        "seconds_per_step": round(seconds / max(trainer.state.global_step - _step_of(resume), 1), 2),
        "rows": rows, "last_row": _last_row(output / CSV_NAME),
    })
    if held_out:
        record.update(evaluation_summary(output / EVAL_CSV_NAME))
    write_json(output / RUN_NAME, record)
    plot_runs(output)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return record


def _evaluate_start(trainer, output: Path) -> None:
    """Score the held-out prompts with the initial policy, and keep the row in rl-eval-start.json."""
    from ummrm.pipeline import write_json

    trainer.evaluate()
    entry = next((entry for entry in reversed(trainer.state.log_history) if EVAL_CSV_COLUMNS["proxy_mean"] in entry), None)
    if entry is None:
        raise UmmrmError("the evaluation before the first step logged no rewards; TRL's evaluation metrics may have changed names.")
    if trainer.is_world_process_zero():
        write_json(output / EVAL_START_NAME, {**entry, "step": 0})


def evaluation_summary(path: Path) -> dict:
    """Return the first, last and highest-gold rows of an rl-eval.csv, for run.json and the CLI's output."""
    columns = read_run(path)
    if not columns.get("step"):
        return {}
    gold = columns["gold_mean"]
    peak = max(range(len(gold)), key=lambda index: -math.inf if math.isnan(gold[index]) else gold[index])

    def row(index: int) -> dict:
        return {name: values[index] for name, values in columns.items()}

    return {"eval_first": row(0), "eval_last": row(len(gold) - 1), "eval_peak_gold": row(peak)}


def _step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX)) if checkpoint else 0


def _save_policy(trainer, folder: Path, settings: dict) -> None:
    from ummrm.models import replace_folder
    from ummrm.pipeline import METADATA_NAME, write_json

    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))
    write_json(staging / METADATA_NAME, {"stage": "rl", "settings": settings})
    replace_folder(staging, folder)


def _last_row(path: Path) -> dict | None:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return rows[-1] if rows else None


# ---------------------------------------------------------------- plots

def _eval_spacing(steps: list[float]) -> int:
    """Return the most common gap between consecutive evaluation steps (the last may be shorter)."""
    gaps = [int(later - earlier) for earlier, later in zip(steps, steps[1:])]
    return max(set(gaps), key=gaps.count) if gaps else 0


def read_run(csv_path: Path) -> dict[str, list[float]]:
    """Read an rl.csv into columns of floats (empty cells become NaN)."""
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    columns = {name: [] for name in (rows[0] if rows else [])}
    for row in rows:
        for name, value in row.items():
            columns[name].append(float(value) if value not in ("", None) else math.nan)
    return columns


def moving_average(values: list[float], window: int) -> list[float]:
    """Return the mean of each run of ``window`` consecutive values (len(values) - window + 1 of them)."""
    if window <= 1:
        return list(values)
    return [sum(values[start : start + window]) / window for start in range(len(values) - window + 1)]


def plot_runs(folder: str | Path, output: str | Path | None = None) -> Path:
    """Plot gold and proxy score against the per-sequence KL for every run (rl.csv) under ``folder``; return the PNG path.

    Gold and proxy are on separate panels because the two reward models have unrelated scales. Dots
    are the logged steps. A run with ``rl-eval.csv`` gets a line with markers through its held-out
    evaluations and a dashed line through moving averages of its training steps. A run without one
    gets only the moving-average line, solid.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    runs = sorted(folder.rglob(CSV_NAME))
    if not runs:
        raise UmmrmError(f"no {CSV_NAME} found under {folder}; give the output folder of `ummrm rl` or a folder above several.")
    output = Path(output) if output else folder / PLOT_NAME

    figure, (gold_axes, proxy_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    plotted = 0
    for csv_path in runs:
        columns = read_run(csv_path)
        if not columns.get("step"):
            logger.warning("%s has no rows yet; leaving it out of the plot", csv_path)
            continue
        kl = columns.get("kl_per_sequence") or columns["kl_per_token"]
        label = str(csv_path.parent.relative_to(folder)) if csv_path.parent != folder else folder.name
        # one batch's KL and scores are noisy, so the line follows moving averages over the steps
        window = max(1, min(MAX_SMOOTHING_WINDOW, len(kl) // 10))
        smoothed_kl = moving_average(kl, window)
        evaluation = read_run(csv_path.with_name(EVAL_CSV_NAME)) if csv_path.with_name(EVAL_CSV_NAME).is_file() else {}
        style = {"linestyle": "--", "linewidth": 1} if evaluation.get("step") else {}
        line, = gold_axes.plot(smoothed_kl, moving_average(columns["gold_mean"], window), label=f"{label}: training, mean of {window} steps", **style)
        color = line.get_color()
        gold_axes.plot(kl, columns["gold_mean"], ".", color=color, alpha=0.3)
        proxy_axes.plot(smoothed_kl, moving_average(columns["proxy_mean"], window), color=color, label=line.get_label(), **style)
        proxy_axes.plot(kl, columns["proxy_mean"], ".", color=color, alpha=0.3)
        if evaluation.get("step"):
            eval_kl = evaluation.get("kl_per_sequence") or evaluation["kl_per_token"]
            eval_label = f"{label}: held-out prompts, every {_eval_spacing(evaluation['step'])} steps"
            gold_axes.plot(eval_kl, evaluation["gold_mean"], "o-", color=color, label=eval_label)
            proxy_axes.plot(eval_kl, evaluation["proxy_mean"], "o-", color=color, label=eval_label)
        plotted += 1
    for axes, title in ((gold_axes, "gold reward model"), (proxy_axes, "proxy reward model")):
        axes.set_xlabel("KL(policy || initial policy) per completion, nats")
        axes.set_ylabel("mean score")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        if plotted:
            axes.legend(fontsize=8)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    plt.close(figure)
    logger.info("plotted %d run(s) into %s", plotted, output)
    return output
