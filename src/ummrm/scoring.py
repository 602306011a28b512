"""Scoring prompt/response rows with any ummrm reward model (dense, MoE or merged)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ummrm.errors import UmmrmError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


def prompt_forms(prompt, row: int) -> tuple[tuple[dict, ...], str, bool]:
    """Return (prompt messages, prompt text, messages only) for a `prompt` value: a string or a message list."""
    if isinstance(prompt, str):
        return ({"role": "user", "content": prompt},), prompt, False
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in prompt):
        return tuple({"role": m["role"], "content": m["content"]} for m in prompt), "", True
    raise UmmrmError(
        f"row {row}: prompt must be a string or a non-empty list of {{'role', 'content'}} messages with roles "
        f"{', '.join(ROLES)}; got {type(prompt).__name__}: {str(prompt)[:80]!r}."
    )


def score_rows(model, tokenizer, rows: list[dict], batch_size: int = 16, max_length: int = 512, text_format: str = "auto") -> list[float]:
    """Return the reward of each ``{"prompt", "response"}`` row."""
    from ummrm.rewards import RewardEncoder, score_sequences

    encoder = RewardEncoder(tokenizer, max_length=max_length, text_format=text_format)
    sequences = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or "prompt" not in row or "response" not in row:
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise UmmrmError(f"row {index}: expected the fields `prompt` and `response`, found {found}.")
        if not isinstance(row["response"], str):
            raise UmmrmError(f"row {index}: response must be a string, got {type(row['response']).__name__}.")
        messages, text, messages_only = prompt_forms(row["prompt"], index)
        sequences.append(encoder.encode(messages, text, row["response"], messages_only))
    return score_sequences(model, sequences, tokenizer.pad_token_id, batch_size)


def score_file(model_reference: str, input_path: str, output_path: str, batch_size: int = 16, max_length: int = 512, text_format: str = "auto") -> int:
    """Score every row of a file and write ``{"row", "prompt", "response", "reward"}`` JSON lines; return the row count."""
    from ummrm.data import read_rows
    from ummrm.models import load_reward_model

    _, rows = read_rows(Path(input_path))
    if not rows:
        raise UmmrmError(f"{input_path} has no rows to score.")
    model, tokenizer = load_reward_model(model_reference)
    rewards = score_rows(model, tokenizer, rows, batch_size, max_length, text_format)
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w") as handle:
        for index, (row, reward) in enumerate(zip(rows, rewards)):
            handle.write(json.dumps({"row": index, "prompt": row["prompt"], "response": row["response"], "reward": reward}) + "\n")
    logger.info("scored %d rows with %s", len(rows), model_reference)
    return len(rows)
