"""Load preference pairs from local files or the Hugging Face Hub, validate them, and split them by prompt.

Three row formats are recognised from the column names (see ``ACCEPTED_FORMATS``), and every row is
normalised to a ``PreferencePair``. A row that cannot be used is skipped and counted under one of
``SKIP_REASONS``, so nothing is dropped without a count.
"""

from __future__ import annotations

import collections
import csv
import gzip
import json
import logging
import math
import numbers
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ummrm.errors import UmmrmError

logger = logging.getLogger(__name__)

SKIP_REASON_DESCRIPTIONS: dict[str, str] = {
    "tie": "the label is 1.5, which marks a tie (alpaca format)",
    "missing_label": "the label is absent, null, NaN or an empty string (alpaca format)",
    "invalid_label": "the label is not 1, 2 or 1.5 as an int, float or numeric string, or it is a boolean",
    "identical_responses": "chosen and rejected are the same text after stripping whitespace",
    "empty_text": "a response, instruction or prompt is empty, whitespace-only, null or absent",
    "wrong_type": (
        "a field has the wrong type: a text that is not a string, a message that is not an object with a"
        " string content and a system, user or assistant role, or a row that is not an object"
    ),
    "unsplittable_dialogue": (
        "no assistant turn to take as the response, or chosen and rejected differ before their last"
        " assistant turn"
    ),
    "identical_after_truncation": (
        "chosen and rejected become the same tokens after truncation to the maximum length, as counted by"
        " the tokenising code rather than by load_preferences"
    ),
}
SKIP_REASONS: tuple[str, ...] = tuple(SKIP_REASON_DESCRIPTIONS)

ACCEPTED_FORMATS: dict[str, str] = {
    "hh": "chosen, rejected and no prompt column: whole dialogues ('\\n\\nHuman: ...\\n\\nAssistant: ...') or message lists",
    "alpaca": "instruction, output_1, output_2, preference (1 or 2), optional input",
    "explicit": "prompt, chosen, rejected: strings, or lists of {role, content} messages",
}

LOCAL_SUFFIXES: tuple[str, ...] = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".csv.gz", ".parquet")

MESSAGE_ROLES = frozenset({"system", "user", "assistant"})

_HH_ASSISTANT_MARKER = "\n\nAssistant:"
# Turn markers of the HH dialogue form. The first turn may start the text without the blank line.
_HH_TURN_PATTERN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred and a rejected response."""

    prompt_messages: tuple[dict, ...]
    prompt_text: str
    chosen: str
    rejected: str
    row: int
    messages_only: bool

    @property
    def prompt_key(self) -> str:
        """Canonical JSON of the prompt messages, equal for pairs that share a prompt."""
        return json.dumps(list(self.prompt_messages), sort_keys=True, ensure_ascii=False)


@dataclass
class PreferenceData:
    """Pairs loaded from one source, with the count of skipped rows per reason."""

    pairs: list[PreferencePair]
    skipped: collections.Counter
    format: str
    columns: list[str]
    num_rows: int
    source: str

    def skip_summary(self) -> str:
        """Return one line with the rows kept and the skip count per reason."""
        reasons = [reason for reason in SKIP_REASONS if self.skipped.get(reason)]
        reasons += sorted(reason for reason in self.skipped if reason not in SKIP_REASONS and self.skipped[reason])
        counts = ", ".join(f"{reason}={self.skipped[reason]}" for reason in reasons) or "none"
        return f"kept {len(self.pairs)} of {self.num_rows} rows; skipped: {counts}"


class _SkipRow(Exception):
    """A row that cannot be used, with one of SKIP_REASONS and a detail for the debug log."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------------
# Public entry points


def load_preferences(
    source: str,
    *,
    config_name: str | None = None,
    data_dir: str | None = None,
    split: str = "train",
    max_rows: int | None = None,
) -> PreferenceData:
    """Load preference pairs from a local file, a local dataset folder or a Hugging Face Hub dataset.

    ``source`` is read as a local file when it ends in one of ``LOCAL_SUFFIXES``, exists as a file, or
    looks like a path (starts with '/', '.', '~' or has more than one '/'). An existing directory is
    loaded with ``datasets.load_dataset(directory, split=split)``. Anything else is a Hub dataset id.
    ``config_name`` and ``data_dir`` apply only to Hub datasets and folders, and ``split`` is ignored
    for a single file. ``max_rows`` keeps the first rows read.

    Raises UmmrmError for a missing or unreadable source, unknown columns, an unreachable Hub, or when
    no usable pair remains after skipping.
    """
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise UmmrmError(f"max_rows must be a positive integer or None, got {max_rows!r}")

    path = Path(source).expanduser()
    if path.is_dir():
        described = _describe_source(source, config_name, data_dir, split)
        columns, rows = _load_with_datasets(source, described, config_name, data_dir, split, max_rows, is_folder=True)
    elif path.exists() or _looks_like_file_path(source):
        if config_name is not None or data_dir is not None:
            raise UmmrmError(
                f"config_name and data_dir apply only to Hub datasets and dataset folders, not to the file {source}. "
                "Remove them."
            )
        described = str(path)
        columns, rows = read_rows(path)
        if max_rows is not None:
            rows = rows[:max_rows]
    else:
        described = _describe_source(source, config_name, data_dir, split)
        columns, rows = _load_with_datasets(source, described, config_name, data_dir, split, max_rows, is_folder=False)

    if not rows:
        raise UmmrmError(f"{described} contains no rows")

    data_format = _detect_format(columns)
    pairs, skipped = _normalise_rows(rows, data_format)
    data = PreferenceData(
        pairs=pairs,
        skipped=skipped,
        format=data_format,
        columns=list(columns),
        num_rows=len(rows),
        source=described,
    )
    logger.info("loaded %s (format %s): %s", described, data_format, data.skip_summary())

    if not pairs:
        skip_counts = ", ".join(f"{reason}={count}" for reason, count in skipped.most_common())
        raise UmmrmError(
            f"no usable preference pairs in {described}: read {len(rows)} rows in the {data_format} format, "
            f"and all were skipped ({skip_counts}). Accepted formats: {_format_list()}"
        )
    return data


def split_by_prompt(
    pairs: list[PreferencePair],
    *,
    eval_fraction: float,
    calibration_fraction: float,
    seed: int,
) -> dict[str, list[PreferencePair]]:
    """Split pairs into "train", "eval" and "calibration" so that all pairs of a prompt share a split.

    The unique prompts are sorted, shuffled with ``random.Random(seed)``, and the first
    ``round(n * eval_fraction)`` go to eval and the next ``round(n * calibration_fraction)`` to
    calibration. With at least 3 prompts, a split whose fraction is above 0 gets at least one prompt.
    Pairs keep their input order within each split. Raises UmmrmError for fractions outside [0, 1), a
    fraction sum of 1 or more, or an empty train split.
    """
    for name, fraction in (("eval_fraction", eval_fraction), ("calibration_fraction", calibration_fraction)):
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 <= fraction < 1:
            raise UmmrmError(f"{name} must be a number in [0, 1), got {fraction!r}")
    if eval_fraction + calibration_fraction >= 1:
        raise UmmrmError(
            f"eval_fraction + calibration_fraction must be below 1 so that train keeps some prompts, "
            f"got {eval_fraction} + {calibration_fraction}"
        )

    prompt_keys = sorted({pair.prompt_key for pair in pairs})
    random.Random(seed).shuffle(prompt_keys)
    num_prompts = len(prompt_keys)

    num_eval = _split_size(num_prompts, eval_fraction)
    num_calibration = _split_size(num_prompts, calibration_fraction)
    if num_prompts - num_eval - num_calibration < 1:
        raise UmmrmError(
            f"cannot split {num_prompts} distinct prompts with eval_fraction={eval_fraction} and "
            f"calibration_fraction={calibration_fraction}: no prompt would be left for train. "
            "Lower the fractions or load more data."
        )

    split_of_prompt = {}
    for index, key in enumerate(prompt_keys):
        if index < num_eval:
            split_of_prompt[key] = "eval"
        elif index < num_eval + num_calibration:
            split_of_prompt[key] = "calibration"
        else:
            split_of_prompt[key] = "train"

    splits: dict[str, list[PreferencePair]] = {"train": [], "eval": [], "calibration": []}
    for pair in pairs:
        splits[split_of_prompt[pair.prompt_key]].append(pair)
    logger.info(
        "split %d prompts: train %d pairs, eval %d pairs, calibration %d pairs",
        num_prompts,
        len(splits["train"]),
        len(splits["eval"]),
        len(splits["calibration"]),
    )
    return splits


def _split_size(num_prompts: int, fraction: float) -> int:
    size = round(num_prompts * fraction)
    if size == 0 and fraction > 0 and num_prompts >= 3:
        size = 1
    return size


# ---------------------------------------------------------------------------------------------------
# Reading sources


def _looks_like_file_path(source: str) -> bool:
    """Return whether ``source`` names a local file rather than a Hub id such as "owner/name"."""
    lowered = source.lower()
    if lowered.endswith(LOCAL_SUFFIXES):
        return True
    return source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1


def _describe_source(source: str, config_name: str | None, data_dir: str | None, split: str) -> str:
    options = [f"config_name={config_name}"] if config_name is not None else []
    if data_dir is not None:
        options.append(f"data_dir={data_dir}")
    options.append(f"split={split}")
    return f"{source} ({', '.join(options)})"


def _format_list() -> str:
    return "; ".join(f"{name}: {columns}" for name, columns in ACCEPTED_FORMATS.items())


# Local files are read with json, gzip, csv and pyarrow rather than `datasets`, because a row with an
# odd type must become a counted skip. Arrow infers one type per column, so `datasets` fails the whole
# file when, for example, `preference` is 2 in one row and "2" or a list in another.
def read_rows(path: Path) -> tuple[list[str], list[Any]]:
    """Read the rows of a local file and return (columns, rows)."""
    if not path.exists():
        raise UmmrmError(f"data file not found: {path}")
    if not path.is_file():
        raise UmmrmError(f"data path is not a file: {path}")

    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            return _read_parquet(path)
        if name.endswith((".jsonl", ".jsonl.gz")):
            return _read_jsonl(path)
        if name.endswith((".json", ".json.gz")):
            return _read_json(path)
        if name.endswith((".csv", ".csv.gz")):
            return _read_csv(path)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:
        raise UmmrmError(f"failed to read {path}: {type(error).__name__}: {error}") from error
    raise UmmrmError(f"unsupported data file type: {path}. Use one of {', '.join(LOCAL_SUFFIXES)}")


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _columns_of(rows: Iterable[Any]) -> list[str]:
    """Return the keys of all object rows, in order of first appearance."""
    columns: dict[str, None] = {}
    for row in rows:
        if isinstance(row, Mapping):
            columns.update(dict.fromkeys(str(key) for key in row))
    return list(columns)


def _parse_json_lines(text: str, path: Path) -> list[Any]:
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise UmmrmError(f"invalid JSON on line {line_number} of {path}: {error.msg} at column {error.colno}") from error
    return rows


def _read_jsonl(path: Path) -> tuple[list[str], list[Any]]:
    with _open_text(path) as file:
        rows = _parse_json_lines(file.read(), path)
    return _columns_of(rows), rows


def _read_json(path: Path) -> tuple[list[str], list[Any]]:
    with _open_text(path) as file:
        text = file.read()
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg != "Extra data":
            raise UmmrmError(
                f"invalid JSON in {path}: {error.msg} at line {error.lineno} column {error.colno}"
            ) from error
        # Several top-level values mean JSON Lines under a .json name, so read the file line by line.
        content = _parse_json_lines(text, path)

    if isinstance(content, list):
        rows = content
    elif isinstance(content, dict):
        list_keys = [key for key, value in content.items() if isinstance(value, list)]
        if len(list_keys) != 1:
            raise UmmrmError(
                f"{path} contains a JSON object with keys {list(content)[:20]}, of which {len(list_keys)} hold a "
                "list. Expected a list of row objects, or an object with exactly one list-valued key holding "
                'the rows, such as {"data": [...]}'
            )
        rows = content[list_keys[0]]
    else:
        raise UmmrmError(
            f"{path} contains a JSON {type(content).__name__}. Expected a list of row objects, or an object "
            'with exactly one list-valued key holding the rows, such as {"data": [...]}'
        )
    return _columns_of(rows), rows


def _read_csv(path: Path) -> tuple[list[str], list[Any]]:
    # The csv module's default field size limit (131072 characters) is below the length of some long
    # responses. The limit is process-wide, so this raises it for every later csv reader too.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with _open_text(path) as file:
        reader = csv.DictReader(file)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    return columns, rows


def _read_parquet(path: Path) -> tuple[list[str], list[Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except pyarrow.ArrowException as error:
        raise UmmrmError(f"failed to read {path} as Parquet: {error}") from error
    return list(table.column_names), table.to_pylist()


def _load_with_datasets(
    source: str,
    described: str,
    config_name: str | None,
    data_dir: str | None,
    split: str,
    max_rows: int | None,
    *,
    is_folder: bool,
) -> tuple[list[str], list[Any]]:
    """Load a Hub dataset or a local dataset folder with ``datasets`` and return (columns, rows)."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        dataset = datasets.load_dataset(source, name=config_name, data_dir=data_dir, split=split)
    except (ConnectionError, TimeoutError, FileNotFoundError, HfHubHTTPError) as error:
        original = " ".join(f"{type(error).__name__}: {error}".split())
        if is_folder:
            raise UmmrmError(f"failed to load the dataset folder {described}: {original}") from error
        if isinstance(error, (DatasetNotFoundError, RepositoryNotFoundError)):
            problem = "the Hugging Face Hub has no dataset with that id, or the Hub could not be reached"
        else:
            problem = "the Hugging Face Hub could not be reached"
        raise UmmrmError(
            f"could not load the dataset {described}: {problem} ({original}). To use a local file instead, "
            "pass --data path/to/pairs.jsonl (.json, .parquet and .csv work too, gzipped or not)."
        ) from error
    except ValueError as error:
        # `datasets` raises ValueError for an unknown split, for example.
        original = " ".join(f"{type(error).__name__}: {error}".split())
        raise UmmrmError(
            f"failed to load the dataset {described}: {original}. Check the split, config_name and data_dir."
        ) from error

    if max_rows is not None and len(dataset) > max_rows:
        dataset = dataset.select(range(max_rows))
    return list(dataset.column_names), dataset.to_list()


# ---------------------------------------------------------------------------------------------------
# Format detection and row normalisation


def _detect_format(columns: list[str]) -> str:
    present = set(columns)
    matches = []
    if {"prompt", "chosen", "rejected"} <= present:
        matches.append("explicit")
    elif {"chosen", "rejected"} <= present:
        matches.append("hh")
    if {"instruction", "output_1", "output_2", "preference"} <= present:
        matches.append("alpaca")

    if len(matches) > 1:
        raise UmmrmError(
            f"the columns {columns} match more than one format ({', '.join(matches)}). Keep only the columns of one "
            f"format. Accepted formats: {_format_list()}"
        )
    if not matches:
        raise UmmrmError(f"unknown data format: found the columns {columns}. Accepted formats: {_format_list()}")
    return matches[0]


def _normalise_rows(rows: list[Any], data_format: str) -> tuple[list[PreferencePair], collections.Counter]:
    pair_from_row = {"hh": _pair_from_hh, "alpaca": _pair_from_alpaca, "explicit": _pair_from_explicit}[data_format]
    pairs = []
    skipped: collections.Counter = collections.Counter()
    for index, row in enumerate(rows):
        try:
            if not isinstance(row, Mapping):
                raise _SkipRow("wrong_type", f"the row is a {type(row).__name__}, not an object")
            if None in row:
                # csv.DictReader stores cells beyond the header under the key None.
                raise _SkipRow("wrong_type", "the row has more cells than the header")
            pairs.append(pair_from_row(row, index))
        except _SkipRow as skip:
            skipped[skip.reason] += 1
            logger.debug("row %d skipped (%s): %s", index, skip.reason, skip.detail)
    return pairs, skipped


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_text(value: Any, field: str) -> str:
    """Return a string field, or "" for a null or absent value. Other types raise a wrong_type skip."""
    if _is_missing(value):
        return ""
    if not isinstance(value, str):
        raise _SkipRow("wrong_type", f"{field} is a {type(value).__name__}, expected a string")
    return value


def _require_text(text: str, field: str) -> None:
    if not text.strip():
        raise _SkipRow("empty_text", f"{field} is empty")


def _require_prompt(messages: tuple[dict, ...], field: str) -> None:
    if not any(message["content"].strip() for message in messages):
        raise _SkipRow("empty_text", f"{field} is empty")


def _require_different(chosen: str, rejected: str) -> None:
    if chosen.strip() == rejected.strip():
        raise _SkipRow("identical_responses", "chosen and rejected are the same text")


def _as_messages(value: Any, field: str) -> tuple[dict, ...]:
    """Validate a list of {"role", "content"} messages and return copies without other keys."""
    if not isinstance(value, (list, tuple)):
        raise _SkipRow("wrong_type", f"{field} is a {type(value).__name__}, expected a list of messages")
    messages = []
    for position, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise _SkipRow("wrong_type", f"{field}[{position}] is a {type(message).__name__}, expected an object")
        role = message.get("role")
        content = message.get("content")
        if role not in MESSAGE_ROLES:
            raise _SkipRow("wrong_type", f"{field}[{position}] has role {role!r}, expected one of {sorted(MESSAGE_ROLES)}")
        if not isinstance(content, str):
            raise _SkipRow("wrong_type", f"{field}[{position}] has content of type {type(content).__name__}, expected a string")
        messages.append({"role": role, "content": content})
    return tuple(messages)


def _split_off_response(messages: tuple[dict, ...], field: str) -> tuple[tuple[dict, ...], str]:
    """Split a conversation that ends in an assistant turn into the earlier messages and the response text."""
    if not messages or messages[-1]["role"] != "assistant":
        raise _SkipRow("unsplittable_dialogue", f"{field} does not end with an assistant message")
    return messages[:-1], messages[-1]["content"]


def _render_messages(messages: tuple[dict, ...]) -> str:
    """Render messages as "role: content" turns, ending where the assistant response starts."""
    return "".join(f"{message['role']}: {message['content']}\n\n" for message in messages) + "assistant: "


def _pair_from_hh(row: Mapping, index: int) -> PreferencePair:
    chosen_value = row.get("chosen")
    rejected_value = row.get("rejected")
    if isinstance(chosen_value, (list, tuple)) or isinstance(rejected_value, (list, tuple)):
        return _pair_from_hh_messages(chosen_value, rejected_value, index)

    chosen_dialogue = _as_text(chosen_value, "chosen")
    rejected_dialogue = _as_text(rejected_value, "rejected")
    _require_text(chosen_dialogue, "chosen")
    _require_text(rejected_dialogue, "rejected")

    chosen_prefix, chosen = _split_hh_dialogue(chosen_dialogue, "chosen")
    rejected_prefix, rejected = _split_hh_dialogue(rejected_dialogue, "rejected")
    if chosen_prefix != rejected_prefix:
        raise _SkipRow("unsplittable_dialogue", "chosen and rejected differ before their last assistant turn")

    prompt_messages = _parse_hh_turns(chosen_prefix)
    _require_prompt(prompt_messages, "the dialogue before the last assistant turn")
    _require_text(chosen, "chosen response")
    _require_text(rejected, "rejected response")
    _require_different(chosen, rejected)
    return PreferencePair(
        prompt_messages=prompt_messages,
        prompt_text=chosen_prefix + _HH_ASSISTANT_MARKER + " ",
        chosen=chosen,
        rejected=rejected,
        row=index,
        messages_only=False,
    )


def _split_hh_dialogue(dialogue: str, field: str) -> tuple[str, str]:
    """Split a dialogue at its last assistant marker into (text before the marker, response)."""
    position = dialogue.rfind(_HH_ASSISTANT_MARKER)
    if position < 0:
        raise _SkipRow("unsplittable_dialogue", f"{field} has no '\\n\\nAssistant:' turn")
    return dialogue[:position], dialogue[position + len(_HH_ASSISTANT_MARKER) :].lstrip()


def _parse_hh_turns(prefix: str) -> tuple[dict, ...]:
    """Parse "\\n\\nHuman: ...\\n\\nAssistant: ..." turns into messages with stripped content."""
    parts = _HH_TURN_PATTERN.split(prefix.lstrip())
    # parts is [text before the first marker, speaker, content, speaker, content, ...].
    if parts[0].strip():
        raise _SkipRow("unsplittable_dialogue", "the dialogue has text before its first 'Human:' or 'Assistant:' turn")
    return tuple(
        {"role": _HH_ROLES[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2])
    )


def _pair_from_hh_messages(chosen_value: Any, rejected_value: Any, index: int) -> PreferencePair:
    chosen_messages = _as_messages(chosen_value, "chosen")
    rejected_messages = _as_messages(rejected_value, "rejected")
    chosen_context, chosen = _split_off_response(chosen_messages, "chosen")
    rejected_context, rejected = _split_off_response(rejected_messages, "rejected")
    if chosen_context != rejected_context:
        raise _SkipRow("unsplittable_dialogue", "chosen and rejected differ before their last assistant message")

    _require_prompt(chosen_context, "the conversation before the last assistant message")
    _require_text(chosen, "chosen response")
    _require_text(rejected, "rejected response")
    _require_different(chosen, rejected)
    return PreferencePair(
        prompt_messages=chosen_context,
        prompt_text=_render_messages(chosen_context),
        chosen=chosen,
        rejected=rejected,
        row=index,
        messages_only=True,
    )


def _pair_from_alpaca(row: Mapping, index: int) -> PreferencePair:
    # Checks run in this order: types, empty texts, identical outputs, then the label. So a row whose
    # outputs are the same text counts as identical_responses whatever its label (real annotation files
    # label such rows 0).
    instruction = _as_text(row.get("instruction"), "instruction")
    output_1 = _as_text(row.get("output_1"), "output_1")
    output_2 = _as_text(row.get("output_2"), "output_2")
    extra_input = _as_text(row.get("input"), "input")

    _require_text(instruction, "instruction")
    _require_text(output_1, "output_1")
    _require_text(output_2, "output_2")
    _require_different(output_1, output_2)
    label = _parse_label(row.get("preference"))

    user_content = instruction + "\n\n" + extra_input if extra_input.strip() else instruction
    chosen, rejected = (output_1, output_2) if label == 1 else (output_2, output_1)
    return PreferencePair(
        prompt_messages=({"role": "user", "content": user_content},),
        prompt_text=user_content + "\n\n",
        chosen=chosen,
        rejected=rejected,
        row=index,
        messages_only=False,
    )


def _parse_label(value: Any) -> int:
    """Return 1 or 2 from an int, float or numeric string label. Ties and other values raise a skip."""
    if isinstance(value, bool):
        raise _SkipRow("invalid_label", f"preference is the boolean {value}")
    if isinstance(value, str):
        if not value.strip():
            raise _SkipRow("missing_label", "preference is an empty string")
        try:
            number = float(value)
        except ValueError:
            raise _SkipRow("invalid_label", f"preference {value!r} is not a number") from None
    elif isinstance(value, numbers.Real):
        number = float(value)
    elif value is None:
        raise _SkipRow("missing_label", "preference is missing")
    else:
        raise _SkipRow("invalid_label", f"preference is a {type(value).__name__}")

    if math.isnan(number):
        raise _SkipRow("missing_label", "preference is NaN")
    if number == 1.5:
        raise _SkipRow("tie", "preference is 1.5")
    if number in (1.0, 2.0):
        return int(number)
    raise _SkipRow("invalid_label", f"preference {value!r} is not 1, 2 or 1.5")


def _pair_from_explicit(row: Mapping, index: int) -> PreferencePair:
    prompt_value = row.get("prompt")
    prompt_is_list = isinstance(prompt_value, (list, tuple))
    if prompt_is_list:
        prompt_messages = _as_messages(prompt_value, "prompt")
    else:
        prompt_string = _as_text(prompt_value, "prompt")
        prompt_messages = ({"role": "user", "content": prompt_string},)

    chosen_value = _explicit_response(row.get("chosen"), "chosen")
    rejected_value = _explicit_response(row.get("rejected"), "rejected")
    chosen_context, chosen = _split_explicit_response(chosen_value, "chosen")
    rejected_context, rejected = _split_explicit_response(rejected_value, "rejected")
    if chosen_context != rejected_context:
        raise _SkipRow("unsplittable_dialogue", "chosen and rejected differ before their last assistant message")

    # A chosen list that carries the whole conversation, as in [user, assistant], is the prompt, and
    # the prompt column is then only type-checked.
    if chosen_context:
        prompt_messages = chosen_context
    messages_only = prompt_is_list or bool(chosen_context)

    _require_prompt(prompt_messages, "prompt")
    _require_text(chosen, "chosen")
    _require_text(rejected, "rejected")
    _require_different(chosen, rejected)
    return PreferencePair(
        prompt_messages=prompt_messages,
        prompt_text=_render_messages(prompt_messages) if messages_only else prompt_messages[0]["content"],
        chosen=chosen,
        rejected=rejected,
        row=index,
        messages_only=messages_only,
    )


def _explicit_response(value: Any, field: str) -> str | tuple[dict, ...]:
    """Return a response given as a string or a message list, after checking its type."""
    if isinstance(value, (list, tuple)):
        return _as_messages(value, field)
    return _as_text(value, field)


def _split_explicit_response(value: str | tuple[dict, ...], field: str) -> tuple[tuple[dict, ...], str]:
    """Split a response string or message list into its context messages and the response text."""
    if isinstance(value, str):
        return (), value
    return _split_off_response(value, field)
