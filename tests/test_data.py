"""Tests for ummrm.data: file types, row formats, skip counts, Hub errors, prompt splits and the real data files."""

import collections
import csv
import gzip
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest

from ummrm.data import (
    SKIP_REASONS,
    PreferenceData,
    PreferencePair,
    load_preferences,
    split_by_prompt,
)
from ummrm.errors import UmmrmError

from conftest import IN_CI, SHARED_DATA
ALPACA_FILE = SHARED_DATA / "alpaca_eval_annotations" / "alpaca-farm-ppo-human.json.gz"
HH_FILE = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
# in CI (CI=true) these tests must run: a missing ../shared/data fails them instead of skipping
needs_shared_data = pytest.mark.skipif(not IN_CI and not SHARED_DATA.is_dir(), reason="../shared/data is not present")

FILE_TYPES = ["jsonl", "jsonl.gz", "json", "json.gz", "json-data", "json-data.gz", "parquet", "csv", "csv.gz"]


def write_rows(directory: Path, rows: list[dict], file_type: str, stem: str = "pairs") -> Path:
    """Write rows as one file type. The "json-data" type is a JSON object {"data": rows}."""
    gzipped = file_type.endswith(".gz")
    kind = file_type.removesuffix(".gz")
    suffix = {"json-data": "json"}.get(kind, kind)
    path = directory / f"{stem}.{suffix}{'.gz' if gzipped else ''}"

    if kind == "parquet":
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
        return path

    if kind == "jsonl":
        text = "".join(json.dumps(row) + "\n" for row in rows)
    elif kind == "json":
        text = json.dumps(rows)
    elif kind == "json-data":
        text = json.dumps({"data": rows, "version": "1"})
    else:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with open(directory / "scratch.csv", "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        text = (directory / "scratch.csv").read_text(encoding="utf-8")

    if gzipped:
        with gzip.open(path, "wt", encoding="utf-8", newline="") as file:
            file.write(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def triples(data: PreferenceData) -> list[tuple[str, str, str]]:
    return [(pair.prompt_text, pair.chosen, pair.rejected) for pair in data.pairs]


HH_ROWS = [
    {
        "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4",
        "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5",
    },
    {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: Blue.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant:  Seven.",
    },
]
HH_EXPECTED = [
    ("\n\nHuman: What is 2+2?\n\nAssistant: ", "4", "5"),
    ("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: ", "Blue.", "Seven."),
]

ALPACA_ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output_1": "5", "output_2": "6", "preference": 1},
    {"instruction": "Name a fruit.", "input": None, "output_1": "Rock", "output_2": "Apple", "preference": 2},
]
ALPACA_EXPECTED = [
    ("Add the numbers.\n\n2 and 3\n\n", "5", "6"),
    ("Name a fruit.\n\n", "Apple", "Rock"),
]

EXPLICIT_ROWS = [
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No.", "margin": 0.5},
    {"prompt": "Count to 2.", "chosen": "1, 2", "rejected": "2, 1", "margin": 1.0},
]
EXPLICIT_EXPECTED = [("Say hi.", "Hi!", "No."), ("Count to 2.", "1, 2", "2, 1")]

FORMAT_CASES = {
    "hh": (HH_ROWS, HH_EXPECTED),
    "alpaca": (ALPACA_ROWS, ALPACA_EXPECTED),
    "explicit": (EXPLICIT_ROWS, EXPLICIT_EXPECTED),
}


# ---------------------------------------------------------------------------------------------------
# Formats and file types


@pytest.mark.parametrize("file_type", FILE_TYPES)
@pytest.mark.parametrize("data_format", list(FORMAT_CASES))
def test_format_in_file_type(tmp_path, data_format, file_type):
    rows, expected = FORMAT_CASES[data_format]
    path = write_rows(tmp_path, rows, file_type)

    data = load_preferences(str(path))

    assert data.format == data_format
    assert triples(data) == expected
    assert data.num_rows == len(rows)
    assert data.columns == list(rows[0])
    assert data.source == str(path)
    assert sum(data.skipped.values()) == 0
    assert [pair.row for pair in data.pairs] == list(range(len(rows)))
    assert not any(pair.messages_only for pair in data.pairs)


def test_hh_prompt_plus_response_join(tmp_path):
    data = load_preferences(str(write_rows(tmp_path, HH_ROWS, "jsonl")))

    first = data.pairs[0]
    assert first.prompt_text + first.chosen == HH_ROWS[0]["chosen"]
    assert first.prompt_text + first.rejected == HH_ROWS[0]["rejected"]


def test_hh_multi_turn_prompt_messages(tmp_path):
    data = load_preferences(str(write_rows(tmp_path, HH_ROWS, "jsonl")))

    assert data.pairs[1].prompt_messages == (
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
    )
    assert data.pairs[0].prompt_messages == ({"role": "user", "content": "What is 2+2?"},)


def test_hh_without_leading_blank_line(tmp_path):
    rows = [{"chosen": "Human: Hi\n\nAssistant: Hello", "rejected": "Human: Hi\n\nAssistant: Go away"}]

    data = load_preferences(str(write_rows(tmp_path, rows, "jsonl")))

    assert triples(data) == [("Human: Hi\n\nAssistant: ", "Hello", "Go away")]
    assert data.pairs[0].prompt_messages == ({"role": "user", "content": "Hi"},)


def test_hh_response_keeps_inline_human_text(tmp_path):
    rows = [
        {
            "chosen": "\n\nHuman: Q\n\nAssistant: A. Human: not a turn",
            "rejected": "\n\nHuman: Q\n\nAssistant: B",
        }
    ]

    data = load_preferences(str(write_rows(tmp_path, rows, "jsonl")))

    assert data.pairs[0].chosen == "A. Human: not a turn"


HH_MESSAGE_ROWS = [
    {
        "chosen": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ],
        "rejected": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Greetings, dear user"},
        ],
    }
]


@pytest.mark.parametrize("file_type", ["jsonl", "json", "parquet"])
def test_hh_message_lists(tmp_path, file_type):
    data = load_preferences(str(write_rows(tmp_path, HH_MESSAGE_ROWS, file_type)))

    pair = data.pairs[0]
    assert data.format == "hh"
    assert pair.prompt_messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    )
    assert pair.chosen == "Hello"
    assert pair.rejected == "Greetings, dear user"
    assert pair.messages_only
    assert pair.prompt_text == "system: Be brief.\n\nuser: Hi\n\nassistant: "


def test_alpaca_with_and_without_input(tmp_path):
    rows = [
        {"instruction": "Translate.", "input": "bonjour", "output_1": "hello", "output_2": "bye", "preference": 1},
        {"instruction": "Translate.", "input": "", "output_1": "hello", "output_2": "bye", "preference": 1},
        {"instruction": "Translate.", "input": "   ", "output_1": "hello", "output_2": "bye", "preference": 1},
        {"instruction": "Translate.", "output_1": "hello", "output_2": "bye", "preference": 1},
    ]

    data = load_preferences(str(write_rows(tmp_path, rows, "jsonl")))

    with_input, *without_input = data.pairs
    assert with_input.prompt_text == "Translate.\n\nbonjour\n\n"
    assert with_input.prompt_messages == ({"role": "user", "content": "Translate.\n\nbonjour"},)
    for pair in without_input:
        assert pair.prompt_text == "Translate.\n\n"
        assert pair.prompt_messages == ({"role": "user", "content": "Translate."},)


def test_alpaca_without_input_column(tmp_path):
    rows = [{"instruction": "Greet.", "output_1": "Hi", "output_2": "Go", "preference": 2}]

    data = load_preferences(str(write_rows(tmp_path, rows, "csv")))

    assert data.columns == ["instruction", "output_1", "output_2", "preference"]
    assert triples(data) == [("Greet.\n\n", "Go", "Hi")]


@pytest.mark.parametrize(
    "preference, chosen",
    [(1, "A"), (2, "B"), (1.0, "A"), (2.0, "B"), ("1", "A"), ("2", "B"), ("2.0", "B"), (" 1 ", "A")],
)
def test_alpaca_label_types(tmp_path, preference, chosen):
    rows = [{"instruction": "Pick.", "output_1": "A", "output_2": "B", "preference": preference}]

    data = load_preferences(str(write_rows(tmp_path, rows, "jsonl")))

    assert data.pairs[0].chosen == chosen
    assert data.pairs[0].rejected == ("B" if chosen == "A" else "A")


def test_alpaca_csv_label_strings(tmp_path):
    rows = [
        {"instruction": "a", "output_1": "x", "output_2": "y", "preference": "1"},
        {"instruction": "b", "output_1": "x", "output_2": "y", "preference": "2"},
        {"instruction": "c", "output_1": "x", "output_2": "y", "preference": "1.5"},
        {"instruction": "d", "output_1": "x", "output_2": "y", "preference": ""},
        {"instruction": "e", "output_1": "x", "output_2": "y", "preference": "2.0"},
    ]

    data = load_preferences(str(write_rows(tmp_path, rows, "csv")))

    assert [pair.chosen for pair in data.pairs] == ["x", "y", "y"]
    assert [pair.row for pair in data.pairs] == [0, 1, 4]
    assert data.skipped == collections.Counter({"tie": 1, "missing_label": 1})


def test_alpaca_float_labels_in_parquet(tmp_path):
    rows = [
        {"instruction": "a", "output_1": "x", "output_2": "y", "preference": 1.0},
        {"instruction": "b", "output_1": "x", "output_2": "y", "preference": None},
        {"instruction": "c", "output_1": "x", "output_2": "y", "preference": 2.0},
    ]

    data = load_preferences(str(write_rows(tmp_path, rows, "parquet")))

    assert [pair.chosen for pair in data.pairs] == ["x", "y"]
    assert data.skipped == collections.Counter({"missing_label": 1})


EXPLICIT_MESSAGE_ROWS = [
    # Prompt as messages, responses as single assistant messages.
    {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello"}],
        "rejected": [{"role": "assistant", "content": "Go away"}],
    },
    # Prompt as messages, responses carrying the whole conversation.
    {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away"}],
    },
]


@pytest.mark.parametrize("file_type", ["jsonl", "json.gz", "parquet"])
def test_explicit_message_lists(tmp_path, file_type):
    data = load_preferences(str(write_rows(tmp_path, EXPLICIT_MESSAGE_ROWS, file_type)))

    first, second = data.pairs
    assert data.format == "explicit"
    assert first.prompt_messages == ({"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"})
    assert second.prompt_messages == ({"role": "user", "content": "Hi"},)
    for pair in data.pairs:
        assert pair.messages_only
        assert (pair.chosen, pair.rejected) == ("Hello", "Go away")
    assert second.prompt_text == "user: Hi\n\nassistant: "


def test_explicit_string_prompt_message_responses(tmp_path):
    rows = [
        # A prompt string with single assistant messages has a faithful plain-text form.
        {
            "prompt": "Hi",
            "chosen": [{"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "assistant", "content": "Go away"}],
        },
        # A prompt string with whole conversations, as in UltraFeedback-style data.
        {
            "prompt": "Hi",
            "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away"}],
        },
    ]

    data = load_preferences(str(write_rows(tmp_path, rows, "jsonl")))

    plain, conversation = data.pairs
    assert not plain.messages_only
    assert plain.prompt_text == "Hi"
    assert conversation.messages_only
    assert plain.prompt_messages == conversation.prompt_messages == ({"role": "user", "content": "Hi"},)
    assert plain.prompt_key == conversation.prompt_key


def test_message_extra_keys_dropped(tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": "Hi", "name": "x"}],
            "chosen": [{"role": "assistant", "content": "Hello", "weight": 1}],
            "rejected": [{"role": "assistant", "content": "Go away"}],
        }
    ]

    data = load_preferences(str(write_rows(tmp_path, rows, "jsonl")))

    assert data.pairs[0].prompt_messages == ({"role": "user", "content": "Hi"},)


def test_json_lines_in_json_file(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text("".join(json.dumps(row) + "\n" for row in EXPLICIT_ROWS), encoding="utf-8")

    assert triples(load_preferences(str(path))) == EXPLICIT_EXPECTED


def test_max_rows(tmp_path):
    path = write_rows(tmp_path, EXPLICIT_ROWS, "jsonl")

    data = load_preferences(str(path), max_rows=1)

    assert data.num_rows == 1
    assert triples(data) == EXPLICIT_EXPECTED[:1]


@pytest.mark.parametrize("max_rows", [0, -1, 1.5, True])
def test_max_rows_invalid(tmp_path, max_rows):
    path = write_rows(tmp_path, EXPLICIT_ROWS, "jsonl")

    with pytest.raises(UmmrmError, match="max_rows"):
        load_preferences(str(path), max_rows=max_rows)


def test_prompt_key_groups_same_prompt():
    first = PreferencePair(({"role": "user", "content": "Hi"},), "Hi", "a", "b", 0, False)
    same = PreferencePair(({"content": "Hi", "role": "user"},), "Hi", "c", "d", 1, False)
    other = PreferencePair(({"role": "user", "content": "Bye"},), "Bye", "a", "b", 2, False)

    assert first.prompt_key == same.prompt_key
    assert first.prompt_key != other.prompt_key


# ---------------------------------------------------------------------------------------------------
# Skip reasons

ALPACA_SKIP_ROWS = [
    ({"instruction": "ok", "output_1": "a", "output_2": "b", "preference": 1}, None),
    ({"instruction": "ok", "output_1": "a", "output_2": "b", "preference": 1.5}, "tie"),
    ({"instruction": "ok", "output_1": "a", "output_2": "b", "preference": "1.5"}, "tie"),
    ({"instruction": "ok", "output_1": "a", "output_2": "b", "preference": None}, "missing_label"),
    ({"instruction": "ok", "output_1": "a", "output_2": "b", "preference": float("nan")}, "missing_label"),
    ({"instruction": "ok", "output_1": "a", "output_2": "b", "preference": ""}, "missing_label"),
    ({"instruction": "ok", "output_1": "a", "output_2": "b"}, "missing_label"),
    ({"instruction": "ok", "output_1": "a", "output_2": "b", "preference": 0}, "invalid_label"),
    ({"instruction": "ok", "output_1": "a", "output_2": "b", "preference": 0.0}, "invalid_label"),
    ({"instruction": "ok", "output_1": "a", "output_2": "b", "preference": 3}, "invalid_label"),
    ({"instruction": "ok", "output_1": "a", "output_2": "b", "preference": "abc"}, "invalid_label"),
    ({"instruction": "ok", "output_1": "a", "output_2": "b", "preference": True}, "invalid_label"),
    ({"instruction": "ok", "output_1": "a", "output_2": "b", "preference": False}, "invalid_label"),
    ({"instruction": "ok", "output_1": "a", "output_2": "b", "preference": [2]}, "invalid_label"),
    ({"instruction": "ok", "output_1": "a", "output_2": "b", "preference": 1.2}, "invalid_label"),
    ({"instruction": "ok", "output_1": "same", "output_2": " same\n", "preference": 0}, "identical_responses"),
    ({"instruction": "ok", "output_1": "same", "output_2": "same", "preference": 1}, "identical_responses"),
    ({"instruction": "ok", "output_1": "same", "output_2": "same", "preference": 1.5}, "identical_responses"),
    ({"instruction": "  ", "output_1": "a", "output_2": "b", "preference": 1}, "empty_text"),
    ({"instruction": "ok", "output_1": "", "output_2": "b", "preference": 1}, "empty_text"),
    ({"instruction": "ok", "output_1": "a", "output_2": None, "preference": 1}, "empty_text"),
    ({"instruction": "ok", "output_1": "", "output_2": "", "preference": 0}, "empty_text"),
    ({"instruction": 7, "output_1": "a", "output_2": "b", "preference": 1}, "wrong_type"),
    ({"instruction": "ok", "output_1": ["a"], "output_2": "b", "preference": 1}, "wrong_type"),
    ({"instruction": "ok", "input": 3, "output_1": "a", "output_2": "b", "preference": 1}, "wrong_type"),
    ({"instruction": 7, "output_1": "same", "output_2": "same", "preference": "x"}, "wrong_type"),
]

EXPLICIT_SKIP_ROWS = [
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, None),
    ({"prompt": "p", "chosen": 5, "rejected": "b"}, "wrong_type"),
    ({"prompt": {"text": "p"}, "chosen": "a", "rejected": "b"}, "wrong_type"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "wrong_type"),
    ({"prompt": [{"role": "robot", "content": "p"}], "chosen": "a", "rejected": "b"}, "wrong_type"),
    ({"prompt": ["p"], "chosen": "a", "rejected": "b"}, "wrong_type"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": None}], "rejected": "b"}, "wrong_type"),
    ("not an object", "wrong_type"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty_text"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "empty_text"),
    ({"prompt": "p", "chosen": " ", "rejected": "b"}, "empty_text"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": ""}], "rejected": "b"}, "empty_text"),
    ({"prompt": "p", "chosen": "a\n", "rejected": "a"}, "identical_responses"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "unsplittable_dialogue"),
    ({"prompt": "p", "chosen": [], "rejected": "b"}, "unsplittable_dialogue"),
    (
        {
            "prompt": "p",
            "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
        },
        "unsplittable_dialogue",
    ),
]

HH_SKIP_ROWS = [
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}, None),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"}, "unsplittable_dialogue"),
    ({"chosen": "\n\nHuman: q a", "rejected": "\n\nHuman: q\n\nAssistant: b"}, "unsplittable_dialogue"),
    ({"chosen": "Intro\n\nHuman: q\n\nAssistant: a", "rejected": "Intro\n\nHuman: q\n\nAssistant: b"}, "unsplittable_dialogue"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: ", "rejected": "\n\nHuman: q\n\nAssistant: b"}, "empty_text"),
    ({"chosen": "\n\nAssistant: a", "rejected": "\n\nAssistant: b"}, "empty_text"),
    ({"chosen": "\n\nHuman:  \n\nAssistant: a", "rejected": "\n\nHuman:  \n\nAssistant: b"}, "empty_text"),
    ({"chosen": None, "rejected": "\n\nHuman: q\n\nAssistant: b"}, "empty_text"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a ", "rejected": "\n\nHuman: q\n\nAssistant: a"}, "identical_responses"),
    ({"chosen": 3, "rejected": "\n\nHuman: q\n\nAssistant: b"}, "wrong_type"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected": "text"}, "wrong_type"),
    (
        {
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "user", "content": "b"}],
        },
        "unsplittable_dialogue",
    ),
    (
        {
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "r"}, {"role": "assistant", "content": "b"}],
        },
        "unsplittable_dialogue",
    ),
]


@pytest.mark.parametrize(
    "cases",
    [ALPACA_SKIP_ROWS, EXPLICIT_SKIP_ROWS, HH_SKIP_ROWS],
    ids=["alpaca", "explicit", "hh"],
)
def test_skip_counts_exact(tmp_path, cases):
    rows = [row for row, _ in cases]
    path = tmp_path / "pairs.json"
    # json.dumps writes NaN as the NaN literal, which json.load reads back as float("nan").
    path.write_text(json.dumps(rows), encoding="utf-8")

    data = load_preferences(str(path))

    expected_skips = collections.Counter(reason for _, reason in cases if reason is not None)
    assert data.skipped == expected_skips
    assert [pair.row for pair in data.pairs] == [index for index, (_, reason) in enumerate(cases) if reason is None]
    assert data.num_rows == len(rows)
    assert len(data.pairs) + sum(data.skipped.values()) == data.num_rows


@pytest.mark.parametrize("cases", [ALPACA_SKIP_ROWS, EXPLICIT_SKIP_ROWS, HH_SKIP_ROWS], ids=["alpaca", "explicit", "hh"])
def test_each_skip_row_reason(tmp_path, cases, caplog):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([row for row, _ in cases]), encoding="utf-8")

    with caplog.at_level(logging.DEBUG, logger="ummrm.data"):
        load_preferences(str(path))

    logged = {}
    for record in caplog.records:
        message = record.getMessage()
        if message.startswith("row "):
            index = int(message.split()[1])
            logged[index] = message.split("(")[1].split(")")[0]
    for index, (row, reason) in enumerate(cases):
        assert logged.get(index) == reason, f"row {index}: {row!r}"


def test_every_skip_reason_covered():
    triggered = {reason for cases in (ALPACA_SKIP_ROWS, EXPLICIT_SKIP_ROWS, HH_SKIP_ROWS) for _, reason in cases}

    assert set(SKIP_REASONS) - triggered == {"identical_after_truncation"}
    assert len(SKIP_REASONS) == 8


def test_csv_row_with_extra_cells(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\np,a,b\nq,c,d,extra\n", encoding="utf-8")

    data = load_preferences(str(path))

    assert triples(data) == [("p", "a", "b")]
    assert data.skipped == collections.Counter({"wrong_type": 1})


def test_skip_summary_and_info_log(tmp_path, caplog):
    rows = [row for row, _ in ALPACA_SKIP_ROWS[:4]]
    path = write_rows(tmp_path, rows, "jsonl")

    with caplog.at_level(logging.INFO, logger="ummrm.data"):
        data = load_preferences(str(path))

    summary = "kept 1 of 4 rows; skipped: tie=2, missing_label=1"
    assert data.skip_summary() == summary
    assert any(summary in record.getMessage() for record in caplog.records if record.levelno == logging.INFO)


def test_skip_summary_without_skips(tmp_path):
    data = load_preferences(str(write_rows(tmp_path, EXPLICIT_ROWS, "jsonl")))

    assert data.skip_summary() == "kept 2 of 2 rows; skipped: none"


# ---------------------------------------------------------------------------------------------------
# Errors


def test_unknown_columns_error(tmp_path):
    path = write_rows(tmp_path, [{"question": "q", "good": "a", "bad": "b"}], "jsonl")

    with pytest.raises(UmmrmError) as raised:
        load_preferences(str(path))

    message = str(raised.value)
    assert "['question', 'good', 'bad']" in message
    for accepted in ("hh:", "alpaca:", "explicit:", "instruction, output_1, output_2, preference"):
        assert accepted in message


def test_ambiguous_columns_error(tmp_path):
    row = {"instruction": "i", "output_1": "a", "output_2": "b", "preference": 1, "chosen": "a", "rejected": "b"}
    path = write_rows(tmp_path, [row], "jsonl")

    with pytest.raises(UmmrmError, match="more than one format"):
        load_preferences(str(path))


def test_no_usable_pairs_error(tmp_path):
    rows = [
        {"instruction": "i", "output_1": "a", "output_2": "b", "preference": 1.5},
        {"instruction": "i", "output_1": "a", "output_2": "a", "preference": 0},
    ]
    path = write_rows(tmp_path, rows, "jsonl")

    with pytest.raises(UmmrmError) as raised:
        load_preferences(str(path))

    message = str(raised.value)
    assert str(path) in message
    assert "read 2 rows" in message
    assert "tie=1" in message
    assert "identical_responses=1" in message
    assert "Accepted formats" in message


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.csv.gz", "missing.parquet", "sub/dir/missing"])
def test_missing_file_error(tmp_path, name):
    path = tmp_path / name

    with pytest.raises(UmmrmError, match="not found") as raised:
        load_preferences(str(path))

    assert str(path) in str(raised.value)


def test_missing_relative_file_error():
    with pytest.raises(UmmrmError, match="not found: no_such_dir/pairs.jsonl"):
        load_preferences("no_such_dir/pairs.jsonl")


def test_empty_file_error(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n", encoding="utf-8")

    with pytest.raises(UmmrmError, match="contains no rows"):
        load_preferences(str(path))


def test_unsupported_suffix_error(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("prompt,chosen,rejected\n", encoding="utf-8")

    with pytest.raises(UmmrmError, match="unsupported data file type"):
        load_preferences(str(path))


@pytest.mark.parametrize(
    "content, expected",
    [
        ({"a": [1], "b": [2]}, "2 hold a list"),
        ({"meta": "x"}, "0 hold a list"),
        ("just a string", "contains a JSON str"),
    ],
)
def test_json_shape_error(tmp_path, content, expected):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(content), encoding="utf-8")

    with pytest.raises(UmmrmError, match=expected):
        load_preferences(str(path))


def test_invalid_json_line_error(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": \n', encoding="utf-8")

    with pytest.raises(UmmrmError, match="invalid JSON on line 2"):
        load_preferences(str(path))


def test_invalid_gzip_error(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(b"not gzip data")

    with pytest.raises(UmmrmError, match="failed to read"):
        load_preferences(str(path))


def test_config_name_with_file_error(tmp_path):
    path = write_rows(tmp_path, EXPLICIT_ROWS, "jsonl")

    with pytest.raises(UmmrmError, match="config_name and data_dir"):
        load_preferences(str(path), config_name="default")


# ---------------------------------------------------------------------------------------------------
# Hub datasets and dataset folders


@pytest.fixture
def offline_datasets(monkeypatch, tmp_path):
    """Import datasets with Hub access off and its cache under tmp_path."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    return datasets


def hub_error_cases():
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    return [
        ConnectionError("Couldn't reach 'nobody/pairs' on the Hub (LocalEntryNotFoundError)"),
        OfflineModeIsEnabled("offline\nmode is enabled"),
        LocalEntryNotFoundError("cannot find the requested files in the local cache"),
        DatasetNotFoundError("Dataset 'nobody/pairs' doesn't exist on the Hub"),
        TimeoutError("read timed out"),
    ]


@pytest.mark.parametrize("error_index", range(5))
def test_hub_unreachable_message(offline_datasets, monkeypatch, error_index):
    error = hub_error_cases()[error_index]
    calls = []

    def failing_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        raise error

    monkeypatch.setattr(offline_datasets, "load_dataset", failing_load_dataset)

    with pytest.raises(UmmrmError) as raised:
        load_preferences("nobody/pairs", config_name="default", split="test")

    message = str(raised.value)
    assert calls == [(("nobody/pairs",), {"name": "default", "data_dir": None, "split": "test"})]
    assert "nobody/pairs" in message
    assert "could not be reached" in message
    assert type(error).__name__ in message
    assert "\n" not in message
    assert "--data path/to/pairs.jsonl" in message
    for suffix in (".json", ".parquet", ".csv", "gzipped"):
        assert suffix in message


def test_hub_value_error_message(offline_datasets, monkeypatch):
    def failing_load_dataset(*args, **kwargs):
        raise ValueError('Unknown split "dev". Should be one of [\'train\'].')

    monkeypatch.setattr(offline_datasets, "load_dataset", failing_load_dataset)

    with pytest.raises(UmmrmError, match="Unknown split"):
        load_preferences("nobody/pairs", split="dev")


def test_hub_load_normalises_rows(offline_datasets, monkeypatch):
    hub_rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(5)]
    monkeypatch.setattr(
        offline_datasets, "load_dataset", lambda *args, **kwargs: offline_datasets.Dataset.from_list(hub_rows)
    )

    data = load_preferences("nobody/pairs", data_dir="harmless", max_rows=3)

    assert data.source == "nobody/pairs (data_dir=harmless, split=train)"
    assert data.num_rows == 3
    assert [pair.prompt_text for pair in data.pairs] == ["p0", "p1", "p2"]


def test_hub_offline_env_fails_fast(tmp_path):
    script = (
        "from ummrm.data import load_preferences\n"
        "from ummrm.errors import UmmrmError\n"
        "try:\n"
        "    load_preferences('nobody/no-such-dataset')\n"
        "except UmmrmError as error:\n"
        "    print(error)\n"
        "    raise SystemExit(3)\n"
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    started = time.monotonic()

    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=60
    )

    elapsed = time.monotonic() - started
    assert result.returncode == 3, result.stderr
    assert "nobody/no-such-dataset" in result.stdout
    assert "could not be reached" in result.stdout
    assert "--data path/to/pairs.jsonl" in result.stdout
    assert "Retrying" not in result.stderr
    assert elapsed < 20


def test_dataset_folder(offline_datasets, tmp_path):
    folder = tmp_path / "pairs-folder"
    folder.mkdir()
    write_rows(folder, EXPLICIT_ROWS, "jsonl", stem="train")

    data = load_preferences(str(folder))

    assert data.format == "explicit"
    assert triples(data) == EXPLICIT_EXPECTED
    assert data.source == f"{folder} (split=train)"


def test_dataset_folder_unknown_split(offline_datasets, tmp_path):
    folder = tmp_path / "pairs-folder"
    folder.mkdir()
    write_rows(folder, EXPLICIT_ROWS, "jsonl", stem="train")

    with pytest.raises(UmmrmError, match="split"):
        load_preferences(str(folder), split="validation")


# ---------------------------------------------------------------------------------------------------
# split_by_prompt


def make_pairs(num_prompts: int, pairs_per_prompt: int = 2) -> list[PreferencePair]:
    pairs = []
    for repeat in range(pairs_per_prompt):
        for prompt in range(num_prompts):
            text = f"prompt {prompt}"
            row = len(pairs)
            pairs.append(PreferencePair(({"role": "user", "content": text},), text, f"a{row}", f"b{row}", row, False))
    return pairs


def prompts_of(pairs: list[PreferencePair]) -> set[str]:
    return {pair.prompt_key for pair in pairs}


def test_split_deterministic_for_seed():
    pairs = make_pairs(50)

    first = split_by_prompt(pairs, eval_fraction=0.2, calibration_fraction=0.1, seed=1)
    second = split_by_prompt(pairs, eval_fraction=0.2, calibration_fraction=0.1, seed=1)
    shuffled_input = split_by_prompt(list(reversed(pairs)), eval_fraction=0.2, calibration_fraction=0.1, seed=1)
    other_seed = split_by_prompt(pairs, eval_fraction=0.2, calibration_fraction=0.1, seed=2)

    assert first == second
    assert prompts_of(first["eval"]) == prompts_of(shuffled_input["eval"])
    assert prompts_of(first["eval"]) != prompts_of(other_seed["eval"])


def test_split_keeps_prompts_together():
    pairs = make_pairs(40, pairs_per_prompt=3)

    splits = split_by_prompt(pairs, eval_fraction=0.25, calibration_fraction=0.1, seed=0)

    assert set(splits) == {"train", "eval", "calibration"}
    assert not prompts_of(splits["train"]) & prompts_of(splits["eval"])
    assert not prompts_of(splits["train"]) & prompts_of(splits["calibration"])
    assert not prompts_of(splits["eval"]) & prompts_of(splits["calibration"])
    assert len(prompts_of(splits["eval"])) == 10
    assert len(prompts_of(splits["calibration"])) == 4
    assert len(prompts_of(splits["train"])) == 26
    assert sum(len(split) for split in splits.values()) == len(pairs)


def test_split_keeps_input_order():
    pairs = make_pairs(20, pairs_per_prompt=2)

    splits = split_by_prompt(pairs, eval_fraction=0.3, calibration_fraction=0.2, seed=5)

    for split in splits.values():
        rows = [pair.row for pair in split]
        assert rows == sorted(rows)


def test_split_small_gets_one_prompt():
    splits = split_by_prompt(make_pairs(3), eval_fraction=0.05, calibration_fraction=0.05, seed=0)

    assert len(prompts_of(splits["eval"])) == 1
    assert len(prompts_of(splits["calibration"])) == 1
    assert len(prompts_of(splits["train"])) == 1


def test_split_zero_fractions():
    pairs = make_pairs(10)

    splits = split_by_prompt(pairs, eval_fraction=0.0, calibration_fraction=0.0, seed=0)

    assert splits["train"] == pairs
    assert splits["eval"] == []
    assert splits["calibration"] == []


@pytest.mark.parametrize(
    "eval_fraction, calibration_fraction",
    [(-0.1, 0.1), (1.0, 0.0), (0.1, 1.2), (0.6, 0.4), (math.nan, 0.1), (True, 0.1)],
)
def test_split_invalid_fractions(eval_fraction, calibration_fraction):
    with pytest.raises(UmmrmError, match="fraction"):
        split_by_prompt(make_pairs(10), eval_fraction=eval_fraction, calibration_fraction=calibration_fraction, seed=0)


def test_split_empty_train_error():
    with pytest.raises(UmmrmError) as raised:
        split_by_prompt(make_pairs(2), eval_fraction=0.5, calibration_fraction=0.4, seed=0)

    message = str(raised.value)
    assert "2 distinct prompts" in message
    assert "eval_fraction=0.5" in message
    assert "calibration_fraction=0.4" in message


# ---------------------------------------------------------------------------------------------------
# Real data files


def expected_alpaca_outcome(row: dict) -> str | None:
    """Return the skip reason for an annotation row, or None for a kept row, by the rules of the loader."""
    if row["output_1"].strip() == row["output_2"].strip():
        return "identical_responses"
    preference = row["preference"]
    if preference is None:
        return "missing_label"
    if preference == 1.5:
        return "tie"
    if preference in (1, 2):
        return None
    return "invalid_label"


@needs_shared_data
def test_real_alpaca_annotations():
    with gzip.open(ALPACA_FILE, "rt", encoding="utf-8") as file:
        rows = json.load(file)
    outcomes = [expected_alpaca_outcome(row) for row in rows]

    data = load_preferences(str(ALPACA_FILE))

    assert data.format == "alpaca"
    assert data.num_rows == len(rows) == 805
    assert data.skipped == collections.Counter(reason for reason in outcomes if reason is not None)
    assert [pair.row for pair in data.pairs] == [index for index, reason in enumerate(outcomes) if reason is None]
    for pair in data.pairs:
        row = rows[pair.row]
        assert pair.prompt_text == row["instruction"] + "\n\n"
        assert pair.chosen == row[f"output_{int(row['preference'])}"]


@needs_shared_data
def test_real_alpaca_split_by_instruction():
    data = load_preferences(str(ALPACA_FILE))

    splits = split_by_prompt(data.pairs, eval_fraction=0.1, calibration_fraction=0.1, seed=0)

    instructions = {name: {pair.prompt_text for pair in split} for name, split in splits.items()}
    assert not instructions["train"] & instructions["eval"]
    assert not instructions["train"] & instructions["calibration"]
    assert not instructions["eval"] & instructions["calibration"]
    assert sum(len(split) for split in splits.values()) == len(data.pairs)


@needs_shared_data
def test_real_hh_dialogues():
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as file:
        rows = [json.loads(line) for line in file]
    marker = "\n\nAssistant:"
    unsplittable = 0
    empty = 0
    for row in rows:
        chosen_cut = row["chosen"].rfind(marker)
        rejected_cut = row["rejected"].rfind(marker)
        if chosen_cut < 0 or rejected_cut < 0 or row["chosen"][:chosen_cut] != row["rejected"][:rejected_cut]:
            unsplittable += 1
        elif not row["chosen"][chosen_cut + len(marker) :].strip() or not row["rejected"][rejected_cut + len(marker) :].strip():
            empty += 1

    data = load_preferences(str(HH_FILE))

    assert data.format == "hh"
    assert data.num_rows == len(rows) == 2312
    assert data.skipped == collections.Counter({"unsplittable_dialogue": unsplittable, "empty_text": empty})
    assert len(data.pairs) == len(rows) - unsplittable - empty
    for pair in data.pairs:
        row = rows[pair.row]
        prompt = pair.prompt_text.rstrip()
        for response, original in ((pair.chosen, row["chosen"]), (pair.rejected, row["rejected"])):
            assert original.startswith(prompt)
            assert original[len(prompt) :].lstrip() == response
        assert pair.prompt_messages[0]["role"] == "user"
        assert pair.prompt_messages[-1]["role"] == "user"
