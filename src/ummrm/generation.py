"""Sampling responses from a policy (any causal LM) for a list of prompts, batched, seeded and resumable."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ummrm.errors import UmmrmError
from ummrm.prompts import Prompt

logger = logging.getLogger(__name__)


@dataclass
class SamplingSettings:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_tokens: int = 256
    batch_size: int = 32
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UmmrmError(f"max_new_tokens={self.max_new_tokens} is invalid: it must be at least 1.")
        if self.temperature <= 0:
            raise UmmrmError(f"temperature={self.temperature} is invalid: sampling needs a temperature above 0.")
        if not 0 < self.top_p <= 1:
            raise UmmrmError(f"top_p={self.top_p} is invalid: it must be in (0, 1].")
        if self.max_prompt_tokens < 1 or self.batch_size < 1:
            raise UmmrmError(f"max_prompt_tokens={self.max_prompt_tokens} and batch_size={self.batch_size} must be at least 1.")


def load_policy(reference: str):
    """Load a causal LM and its tokenizer for generation (left padding, eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ummrm.models import resolve_model

    resolved = resolve_model(reference)
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        # generation masks padding through the attention mask, so reusing eos as pad is safe here
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32)
    return model.eval(), tokenizer


def render_prompt(tokenizer, prompt: Prompt, max_prompt_tokens: int) -> list[int]:
    """Return the token ids of a prompt in the policy's chat format, keeping its last ``max_prompt_tokens``."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(list(prompt.messages), add_generation_prompt=True, tokenize=True, return_dict=False)
    else:
        text = "".join(f"{message['role']}: {message['content']}\n\n" for message in prompt.messages) + "assistant: "
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    ids = list(ids)
    # the end of a dialogue contains the turn to respond to, so long prompts lose their start
    return ids[-max_prompt_tokens:]


def sample_responses(policy_reference: str, prompts: list[Prompt], num_samples: int, settings: SamplingSettings,
                     output: Path) -> list[list[str]]:
    """Sample ``num_samples`` responses per prompt, returning them in prompt order.

    Responses are appended to ``output`` (JSON lines, one line per prompt) as each batch finishes, and
    batches already there are not sampled again, so an interrupted run resumes where it stopped. Prompts
    are cut into fixed batches of ``batch_size // num_samples`` prompts and each batch has its own seed
    derived from ``settings.seed``, so a resumed run samples what an uninterrupted one would.
    """
    settings.check()
    if num_samples < 1:
        raise UmmrmError(f"num_samples={num_samples} is invalid: sample at least 1 response per prompt.")
    done = _read_finished(output, prompts, num_samples)
    prompts_per_batch = max(1, settings.batch_size // num_samples)
    batches = [list(range(start, min(start + prompts_per_batch, len(prompts)))) for start in range(0, len(prompts), prompts_per_batch)]
    todo = [(number, batch) for number, batch in enumerate(batches) if not all(index in done for index in batch)]
    if todo:
        model, tokenizer = load_policy(policy_reference)
        logger.info("sampling %d responses for each of %d prompts with %s (%d prompts already in %s)",
                    num_samples, len(prompts), policy_reference, len(done), output)
        output.parent.mkdir(parents=True, exist_ok=True)
        with output.open("a") as handle:
            for number, batch in todo:
                responses, truncated = _generate(model, tokenizer, [prompts[index] for index in batch], number, num_samples, settings)
                for position, index in enumerate(batch):
                    record = {"index": index, "prompt": prompts[index].to_json(), "responses": responses[position], "truncated": truncated[position]}
                    done[index] = record
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
                logger.info("sampled %d of %d prompts", len(done), len(prompts))
    return [done[index]["responses"] for index in range(len(prompts))]


@torch.no_grad()
def _generate(model, tokenizer, prompts: list[Prompt], batch_number: int, num_samples: int,
              settings: SamplingSettings) -> tuple[list[list[str]], list[int]]:
    """Sample ``num_samples`` responses for each prompt of one left-padded batch; also count those cut at max_new_tokens."""
    encoded = [render_prompt(tokenizer, prompt, settings.max_prompt_tokens) for prompt in prompts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    torch.manual_seed(settings.seed * 1_000_003 + batch_number)
    outputs = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=0,
        max_new_tokens=settings.max_new_tokens,
        num_return_sequences=num_samples,
        pad_token_id=tokenizer.pad_token_id,
    )
    completions = outputs[:, width:].tolist()
    eos_ids = _eos_ids(model, tokenizer)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    responses, truncated = [], []
    for row in range(len(prompts)):
        rows = range(row * num_samples, (row + 1) * num_samples)
        responses.append([texts[i].strip() for i in rows])
        truncated.append(sum(1 for i in rows if not any(token in eos_ids for token in completions[i])))
    return responses, truncated


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        ids = set()
    elif isinstance(eos, list):
        ids = set(eos)
    else:
        ids = {eos}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _read_finished(output: Path, prompts: list[Prompt], num_samples: int) -> dict[int, dict]:
    """Read the prompts already sampled into ``output``; a torn last line from a crash is dropped."""
    done: dict[int, dict] = {}
    if not output.exists():
        return done
    lines = output.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                logger.warning("dropping an incomplete last line of %s (an interrupted write)", output)
                break
            raise UmmrmError(f"{output} line {number + 1} is not valid JSON; delete the file to sample again.") from None
        index = record.get("index")
        if not isinstance(index, int) or not 0 <= index < len(prompts) or Prompt.from_json(record["prompt"]).key != prompts[index].key:
            raise UmmrmError(f"{output} line {number + 1} belongs to other prompts than this run's; use a new output folder or delete the file.")
        if len(record["responses"]) != num_samples:
            raise UmmrmError(f"{output} line {number + 1} has {len(record['responses'])} samples, this run asks for {num_samples}; delete the file to sample again.")
        done[index] = record
        kept.append(line)
    if len(kept) != len(lines):
        output.write_text("".join(line + "\n" for line in kept))
    return done
