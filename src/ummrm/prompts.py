"""Prompts for a policy to answer: loading them from any data source and splitting them by prompt.

A prompt is a tuple of chat messages that ends with a user turn. Three kinds of source give prompts:

- instruction files with an ``instruction`` column and an optional ``input`` column, such as the
  AlpacaFarm evaluation instructions. A non-empty ``input`` is appended to the instruction after a
  blank line, as AlpacaFarm's prompt template does;
- files whose ``prompt`` column is a string or a message list, with no ``chosen`` and ``rejected`` columns;
- any preference source that ``ummrm.data.load_preferences`` reads (HH dialogues, AlpacaEval
  annotations, explicit pairs). Each distinct prompt of its pairs is used once.
"""

from __future__ import annotations

import collections
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from ummrm.config import option
from ummrm.data import MESSAGE_ROLES, _describe_source, _load_with_datasets, _looks_like_file_path, load_preferences, read_rows
from ummrm.errors import UmmrmError

logger = logging.getLogger(__name__)


@dataclass
class PromptSourceConfig:
    source: str = option("Anthropic/hh-rlhf", "prompts: a Hub dataset id or a local file of instructions (instruction, input), prompts (prompt) or preference pairs")
    hub_config: str | None = option(None, "Hub dataset configuration name, if the dataset has several")
    data_dir: str | None = option("harmless-base", "folder inside the Hub dataset; ignored for local files")
    hub_split: str = option("train", "Hub dataset split; ignored for local files")
    max_rows: int | None = option(None, "read at most this many rows of the source (none: all)")


@dataclass(frozen=True)
class Prompt:
    """Chat messages that end with the user turn the policy responds to."""

    messages: tuple[dict, ...]

    @property
    def key(self) -> str:
        """Canonical JSON of the messages, equal for equal prompts."""
        return json.dumps(list(self.messages), sort_keys=True, ensure_ascii=False)

    def to_json(self) -> list[dict]:
        return [dict(message) for message in self.messages]

    @classmethod
    def from_json(cls, value: list[dict]) -> "Prompt":
        return cls(tuple({"role": message["role"], "content": message["content"]} for message in value))


def load_prompts(source: str, *, hub_config: str | None = None, data_dir: str | None = None, hub_split: str = "train",
                 max_rows: int | None = None) -> list[Prompt]:
    """Load the distinct prompts of a source, in order of first appearance.

    Rows without a usable prompt are skipped, counted and logged. Raises UmmrmError when none remains.
    """
    path = Path(source).expanduser()
    is_file = path.is_file() or (not path.exists() and _looks_like_file_path(source))
    if is_file:
        # Hub options describe a config's default Hub source and do not apply to a local file
        hub_config = data_dir = None
        described = str(path)
        columns, rows = read_rows(path)
        if max_rows is not None:
            rows = rows[:max_rows]
    else:
        described = _describe_source(source, hub_config, data_dir, hub_split)
        columns, rows = _load_with_datasets(source, described, hub_config, data_dir, hub_split, max_rows, is_folder=path.is_dir())
    present = set(columns)
    if not {"chosen", "rejected"} <= present and not {"output_1", "output_2"} <= present:
        if "instruction" in present:
            return _distinct(_instruction_prompts(rows), described)
        if "prompt" in present:
            return _distinct(_prompt_column(rows), described)
    data = load_preferences(source, config_name=hub_config, data_dir=data_dir, split=hub_split, max_rows=max_rows)
    pairs = [(pair.row, pair.prompt_messages) for pair in data.pairs]
    return _distinct((pairs, collections.Counter()), data.source)


def _instruction_prompts(rows: list) -> tuple[list[tuple[int, tuple[dict, ...]]], collections.Counter]:
    prompts, skipped = [], collections.Counter()
    for index, row in enumerate(rows):
        instruction = row.get("instruction") if isinstance(row, dict) else None
        extra = row.get("input") if isinstance(row, dict) else None
        if not isinstance(instruction, str) or not instruction.strip():
            skipped["missing_instruction"] += 1
            logger.debug("row %d: no instruction text", index)
            continue
        text = instruction.strip()
        if isinstance(extra, str) and extra.strip():
            text = f"{text}\n\n{extra.strip()}"
        prompts.append((index, ({"role": "user", "content": text},)))
    return prompts, skipped


def _prompt_column(rows: list) -> tuple[list[tuple[int, tuple[dict, ...]]], collections.Counter]:
    prompts, skipped = [], collections.Counter()
    for index, row in enumerate(rows):
        value = row.get("prompt") if isinstance(row, dict) else None
        if isinstance(value, str) and value.strip():
            prompts.append((index, ({"role": "user", "content": value},)))
        elif (isinstance(value, list) and value and all(isinstance(m, dict) and m.get("role") in MESSAGE_ROLES and isinstance(m.get("content"), str) for m in value)
              and value[-1]["role"] == "user"):
            prompts.append((index, tuple({"role": m["role"], "content": m["content"]} for m in value)))
        else:
            skipped["unusable_prompt"] += 1
            logger.debug("row %d: prompt is not a non-empty string or a message list ending with a user turn", index)
    return prompts, skipped


def _distinct(found: tuple[list[tuple[int, tuple[dict, ...]]], collections.Counter], described: str) -> list[Prompt]:
    rows, skipped = found
    seen, prompts = set(), []
    for _, messages in rows:
        prompt = Prompt(messages)
        if prompt.key in seen:
            skipped["duplicate_prompt"] += 1
            continue
        seen.add(prompt.key)
        prompts.append(prompt)
    counts = ", ".join(f"{reason}={count}" for reason, count in sorted(skipped.items())) or "none"
    logger.info("loaded %d distinct prompts from %s; skipped: %s", len(prompts), described, counts)
    if not prompts:
        raise UmmrmError(f"no usable prompt in {described} (skipped: {counts}); give instructions, prompts or preference pairs.")
    return prompts


def split_prompts(prompts: list[Prompt], num_held_out: int, num_train: int | None, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Shuffle the distinct prompts with ``seed`` and return (training prompts, held-out prompts).

    The first ``num_held_out`` shuffled prompts are held out and the next ``num_train`` (none: all the
    rest) are for training, so the two sets never share a prompt.
    """
    if num_held_out < 1:
        raise UmmrmError(f"num_held_out={num_held_out} is invalid: hold out at least 1 prompt.")
    if num_train is not None and num_train < 1:
        raise UmmrmError(f"num_train={num_train} is invalid: use at least 1 training prompt, or none for all the rest.")
    wanted = num_held_out + (num_train or 1)
    if len(prompts) < wanted:
        raise UmmrmError(
            f"the source has {len(prompts)} distinct prompts, fewer than the {wanted} needed "
            f"({num_held_out} held out + {num_train or 1} for training); lower the counts or load more rows."
        )
    order = sorted(prompts, key=lambda prompt: prompt.key)
    random.Random(seed).shuffle(order)
    held_out = order[:num_held_out]
    rest = order[num_held_out:]
    return (rest if num_train is None else rest[:num_train]), held_out
