"""From text to rewards: rendering a prompt and response, truncating, padding and reading the reward.

A reward ``r(x, y)`` is the scalar head's output at the last real token of ``x ⊕ y``. The position is
read from the attention mask, never from the pad token id: many chat models (SmolLM2 among them) ship
with the end-of-turn token as pad token, and pooling "the last token that is not pad" then reads the
wrong position. Position ids are computed from the attention mask too, so that a reward does not
depend on the padding side, the padded length or the batch size.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import nn

from ummrm.errors import UmmrmError

if TYPE_CHECKING:
    from ummrm.data import PreferencePair

logger = logging.getLogger(__name__)

TEXT_FORMATS = ("auto", "chat", "plain")


@dataclass
class EncodedPair:
    """The token ids of one preference pair, ready for a batch."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    row: int


class RewardEncoder:
    """Turns (prompt, response) into token ids the same way for training, evaluation and scoring.

    ``text_format`` chooses how the text is built. ``chat`` applies the tokenizer's own chat template to
    the prompt messages plus an assistant message. ``plain`` concatenates ``prompt_text + response``.
    ``auto`` uses ``chat`` when the tokenizer has a template and ``plain`` otherwise.

    Sequences longer than ``max_length`` tokens lose the beginning of the prompt first (down to
    ``max_prompt_length`` tokens), then the middle of the response: the end of the response, where the
    reward is read, always stays visible.
    """

    def __init__(self, tokenizer, max_length: int = 512, max_prompt_length: int | None = None, text_format: str = "auto"):
        if text_format not in TEXT_FORMATS:
            raise UmmrmError(f"text_format={text_format!r} is invalid; choose one of {', '.join(TEXT_FORMATS)}.")
        if max_length < 8:
            raise UmmrmError(f"max_length={max_length} is too small to hold a prompt and a response; use at least 8.")
        if tokenizer.pad_token_id is None:
            raise UmmrmError("the tokenizer has no pad token; load it with ummrm.models.load_tokenizer, which sets one.")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length if max_prompt_length is not None else max_length // 2
        if not 0 <= self.max_prompt_length < max_length:
            # a prompt allowed all max_length tokens would leave no room for the response, whose end carries the reward
            raise UmmrmError(
                f"max_prompt_length={self.max_prompt_length} is invalid: it must be between 0 and {max_length - 1} "
                f"(max_length - 1), so that the end of the response stays in the text."
            )
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if text_format == "auto":
            text_format = "chat" if has_template else "plain"
        if text_format == "chat" and not has_template:
            raise UmmrmError(
                "text_format='chat' needs a chat template, but the tokenizer has none; use text_format='plain' "
                "or a model whose tokenizer ships a template."
            )
        self.text_format = text_format
        self.pad_token_id = tokenizer.pad_token_id

    def describe(self) -> dict:
        """Return how text is built, for the metadata saved with a run."""
        return {
            "text_format": self.text_format,
            "chat_template": self.tokenizer.chat_template if self.text_format == "chat" else None,
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
            "pad_token": self.tokenizer.pad_token,
        }

    def render(self, prompt_messages: Sequence[dict], prompt_text: str, response: str, messages_only: bool = False) -> tuple[str, int]:
        """Return the full text and the character offset where the response starts."""
        if self.text_format == "plain":
            if messages_only:
                raise UmmrmError(
                    "the data gives prompts as message lists, but the model's tokenizer has no chat template to "
                    "render them; use a model with a chat template, or data with plain-text prompts."
                )
            return prompt_text + response, len(prompt_text)

        messages = list(prompt_messages)
        prefix = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": response}], tokenize=False
        )
        if full.startswith(prefix):
            return full, len(prefix)
        # some templates render the last assistant turn differently from the generation prompt
        position = full.rfind(response) if response else -1
        return full, max(position, 0)

    def encode(self, prompt_messages: Sequence[dict], prompt_text: str, response: str, messages_only: bool = False) -> list[int]:
        """Return the token ids of prompt and response, truncated to ``max_length``."""
        text, response_start = self.render(prompt_messages, prompt_text, response, messages_only)
        # the chat template writes its own special tokens; plain text gets the tokenizer's usual ones
        encoding = self.tokenizer(
            text, add_special_tokens=self.text_format == "plain", return_offsets_mapping=True
        )
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        if self.pad_token_id in ids:
            ids, offsets = self._pad_text_as_plain(ids, offsets)
        if len(ids) <= self.max_length:
            return ids
        split = next((i for i, (_, end) in enumerate(offsets) if end > response_start), len(ids))
        return self._truncate(ids[:split], ids[split:])

    def _pad_text_as_plain(self, ids: list[int], offsets: list) -> tuple[list[int], list]:
        """Replace each pad token id with the ids of the pad token's characters as ordinary text.

        A text can contain the pad token's string, for example a policy's sample that writes "<|pad|>".
        Read as the pad token, it would make training's pad-id pooling stop early. Read as characters,
        it is ordinary text, so the reward does not depend on padding.
        """
        pieces = self.tokenizer(self.tokenizer.pad_token, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if self.pad_token_id in pieces:
            raise UmmrmError(
                f"the pad token {self.tokenizer.pad_token!r} cannot be encoded as plain text by this tokenizer; "
                "remove it from the data."
            )
        new_ids, new_offsets = [], []
        for token, offset in zip(ids, offsets):
            if token == self.pad_token_id:
                new_ids.extend(pieces)
                new_offsets.extend([offset] * len(pieces))
            else:
                new_ids.append(token)
                new_offsets.append(offset)
        return new_ids, new_offsets

    def _truncate(self, prompt_ids: list[int], response_ids: list[int]) -> list[int]:
        kept_prompt = min(len(prompt_ids), self.max_prompt_length)
        response_budget = self.max_length - kept_prompt
        if len(response_ids) > response_budget:
            # drop the middle of the response: its end carries the reward, its start the answer's opening
            tail = (response_budget + 1) // 2
            head = response_budget - tail
            response_ids = response_ids[:head] + response_ids[len(response_ids) - tail :]
        kept_prompt = self.max_length - len(response_ids)
        prompt_ids = prompt_ids[len(prompt_ids) - kept_prompt :] if kept_prompt > 0 else []
        return prompt_ids + response_ids

    def encode_pairs(self, pairs: Iterable["PreferencePair"]) -> tuple[list[EncodedPair], Counter]:
        """Encode preference pairs; pairs whose responses become identical after truncation are skipped and counted."""
        encoded, skipped = [], Counter()
        for pair in pairs:
            chosen = self.encode(pair.prompt_messages, pair.prompt_text, pair.chosen, pair.messages_only)
            rejected = self.encode(pair.prompt_messages, pair.prompt_text, pair.rejected, pair.messages_only)
            if chosen == rejected:
                skipped["identical_after_truncation"] += 1
                logger.debug("row %d skipped: chosen and rejected are identical after truncation", pair.row)
                continue
            encoded.append(EncodedPair(chosen, rejected, pair.row))
        if skipped:
            logger.info(
                "skipped %d pairs whose responses are identical after truncation to %d tokens",
                skipped["identical_after_truncation"],
                self.max_length,
            )
        return encoded, skipped


def pad_sequences(sequences: Sequence[Sequence[int]], pad_token_id: int, padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists into ``(input_ids, attention_mask)`` tensors of shape (batch, longest)."""
    if padding_side not in ("right", "left"):
        raise UmmrmError(f"padding_side={padding_side!r} is invalid; use 'right' or 'left'.")
    longest = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if padding_side == "right":
            columns = slice(0, len(sequence))
        else:
            columns = slice(longest - len(sequence), longest)
        input_ids[row, columns] = torch.as_tensor(list(sequence), dtype=torch.long)
        attention_mask[row, columns] = 1
    return input_ids, attention_mask


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Return the index of the last real token of each row, for right or left padding."""
    length = attention_mask.shape[-1]
    return length - 1 - attention_mask.flip(-1).argmax(dim=-1)


def compute_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Return the reward (batch,) of a sequence-classification model with a one-output ``score`` head."""
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    outputs = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = outputs.last_hidden_state  # (batch, seq, hidden)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last_hidden = hidden[rows, last_token_index(attention_mask)]  # (batch, hidden)
    return model.score(last_hidden).squeeze(-1).float()


def forward_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Return the rewards (batch,) through the model's own forward, as training needs.

    A DDP or DeepSpeed wrapper synchronises gradients only through its ``forward``, so training calls
    the wrapped model itself. Its pooling reads the last token that is not the pad token, which is the
    last real token because ummrm's pad token never occurs in the ids (``RewardEncoder`` encodes
    the pad token's string in a text as ordinary characters). Position ids come from the mask, as in ``compute_rewards``.
    """
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return outputs.logits[:, 0].float()


@torch.no_grad()
def score_sequences(model: nn.Module, sequences: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 16) -> list[float]:
    """Return the reward of each token id sequence, batching sequences of similar length together."""
    model.eval()
    device = next(model.parameters()).device
    rewards = [0.0] * len(sequences)
    # sorting by length only changes padding, which the reward does not depend on
    order = sorted(range(len(sequences)), key=lambda index: len(sequences[index]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        input_ids, attention_mask = pad_sequences([sequences[i] for i in batch], pad_token_id)
        values = compute_rewards(model, input_ids.to(device), attention_mask.to(device))
        for index, value in zip(batch, values.tolist()):
            rewards[index] = value
    return rewards
