"""Rewards from token ids: invariance to padding and batching, and truncation of prompt and response."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch, tiny_reward_model

from ummrm.data import PreferencePair
from ummrm.errors import UmmrmError
from ummrm.rewards import RewardEncoder, compute_rewards, last_token_index, pad_sequences, score_sequences
from ummrm.upcycle import upcycle

REWARD_TOLERANCE = 1e-4
PAD = 0
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def real_sequences(seed: int = 0) -> list[list[int]]:
    """Return random token id lists of lengths 12, 9, 6 and 3 that never contain the pad id."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 96, (length,), generator=generator).tolist() for length in (12, 9, 6, 3)]


@torch.no_grad()
def rewards_of(model, sequences, padding_side: str = "right", extra: int = 0) -> torch.Tensor:
    """Return the rewards of ``sequences`` padded together, with ``extra`` more pad columns on the padding side."""
    input_ids, attention_mask = pad_sequences(sequences, PAD, padding_side)
    if extra:
        pad_ids = torch.full((len(sequences), extra), PAD)
        pad_mask = torch.zeros((len(sequences), extra), dtype=torch.long)
        if padding_side == "right":
            input_ids, attention_mask = torch.cat([input_ids, pad_ids], 1), torch.cat([attention_mask, pad_mask], 1)
        else:
            input_ids, attention_mask = torch.cat([pad_ids, input_ids], 1), torch.cat([pad_mask, attention_mask], 1)
    return compute_rewards(model, input_ids, attention_mask)


# ---------------------------------------------------------------- invariance of rewards


def test_rewards_padding_side(family):
    model = tiny_reward_model(family)
    sequences = real_sequences()

    right = rewards_of(model, sequences, "right")
    left = rewards_of(model, sequences, "left")

    difference = max_difference(right, left)
    assert difference < REWARD_TOLERANCE, f"{family}: left and right padding give rewards {difference:.3g} apart"


def test_rewards_extra_padding(family):
    model = tiny_reward_model(family)
    sequences = real_sequences()

    for side in ("right", "left"):
        tight = rewards_of(model, sequences, side)
        padded = rewards_of(model, sequences, side, extra=7)
        difference = max_difference(tight, padded)
        assert difference < REWARD_TOLERANCE, f"{family}: 7 more pad columns on the {side} move rewards by {difference:.3g}"


def test_rewards_batch_size(family):
    model = tiny_reward_model(family)
    sequences = real_sequences()

    batched = rewards_of(model, sequences)
    single = torch.cat([rewards_of(model, [sequence]) for sequence in sequences])

    difference = max_difference(batched, single)
    assert difference < REWARD_TOLERANCE, f"{family}: batched and one-by-one rewards differ by {difference:.3g}"


def test_rewards_ignore_pad_token_ids():
    # rewards are read through the attention mask, so whatever ids fill the pad positions changes nothing
    model = tiny_reward_model("llama")
    input_ids, attention_mask = random_batch(batch=3, length=10, seed=0)
    filled = input_ids.clone()
    filled[attention_mask == 0] = 7

    with torch.no_grad():
        difference = max_difference(compute_rewards(model, input_ids, attention_mask), compute_rewards(model, filled, attention_mask))

    assert difference < REWARD_TOLERANCE, f"the ids in pad positions move rewards by {difference:.3g}"


def test_moe_rewards_padding_side():
    model = tiny_reward_model("llama")
    upcycle(model, num_experts=4, top_k=2, router_init_std=1.0, perturb_fraction=0.5, seed=0)
    sequences = real_sequences()

    difference = max_difference(rewards_of(model, sequences, "right"), rewards_of(model, sequences, "left", extra=3))

    assert difference < REWARD_TOLERANCE, f"MoE rewards differ by {difference:.3g} between right and left padding"


def test_score_sequences_keeps_order():
    model = tiny_reward_model("llama")
    sequences = real_sequences()
    sequences = [sequences[2], sequences[0], sequences[3], sequences[1]]  # not sorted by length

    scores = torch.tensor(score_sequences(model, sequences, PAD, batch_size=3))
    expected = torch.cat([rewards_of(model, [sequence]) for sequence in sequences])

    difference = max_difference(scores, expected)
    assert difference < REWARD_TOLERANCE, f"score_sequences differs from one-by-one rewards by {difference:.3g}"


# ---------------------------------------------------------------- padding helpers


def test_last_token_index_by_hand():
    attention_mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right padding: last real token at 2
            [1, 1, 1, 1, 1],  # no padding: 4
            [0, 0, 1, 1, 1],  # left padding: 4
            [1, 0, 0, 0, 0],  # one real token: 0
            [0, 0, 0, 0, 1],  # one real token, left padded: 4
        ]
    )

    assert last_token_index(attention_mask).tolist() == [2, 4, 4, 0, 4]


def test_pad_sequences_by_hand():
    right_ids, right_mask = pad_sequences([[5, 6, 7], [8]], PAD)
    left_ids, left_mask = pad_sequences([[5, 6, 7], [8]], PAD, padding_side="left")

    assert right_ids.tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert right_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert left_ids.tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert left_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pad_sequences_invalid_side():
    with pytest.raises(UmmrmError, match=r"padding_side='middle' is invalid; use 'right' or 'left'"):
        pad_sequences([[1, 2]], PAD, padding_side="middle")


# ---------------------------------------------------------------- encoding and truncation


def tiny_tokenizer(chat_template: bool = True, pad: bool = True):
    """Return a word-level fast tokenizer over the words w0 ... w199, with special tokens and optionally a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    roles = ["<|user|>", "<|assistant|>", "<|end|>"]
    vocabulary = ["<pad>", "<eos>", "<unk>"] + roles + [f"w{number}" for number in range(200)]
    core = Tokenizer(models.WordLevel({token: index for index, token in enumerate(vocabulary)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    options = dict(eos_token="<eos>", unk_token="<unk>", additional_special_tokens=roles)
    if pad:
        options["pad_token"] = "<pad>"
    if chat_template:
        options["chat_template"] = CHAT_TEMPLATE
    return PreTrainedTokenizerFast(tokenizer_object=core, **options)


def words(start: int, stop: int) -> str:
    return " ".join(f"w{number}" for number in range(start, stop))


def word_ids(tokenizer, start: int, stop: int) -> list[int]:
    return tokenizer.convert_tokens_to_ids([f"w{number}" for number in range(start, stop)])


def encode_plain(encoder: RewardEncoder, prompt: str, response: str) -> list[int]:
    return encoder.encode(({"role": "user", "content": prompt},), prompt + " ", response)


def pair(prompt: str, chosen: str, rejected: str, row: int = 0) -> PreferencePair:
    return PreferencePair(({"role": "user", "content": prompt},), prompt + " ", chosen, rejected, row, False)


def test_encode_plain_text():
    tokenizer = tiny_tokenizer()
    encoder = RewardEncoder(tokenizer, max_length=64, text_format="plain")

    ids = encode_plain(encoder, words(0, 3), words(10, 14))

    assert ids == word_ids(tokenizer, 0, 3) + word_ids(tokenizer, 10, 14)


def test_encode_chat_template():
    tokenizer = tiny_tokenizer()
    encoder = RewardEncoder(tokenizer, max_length=64, text_format="chat")
    user, assistant, end = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|end|>"])

    ids = encode_plain(encoder, words(0, 3), words(10, 14))

    # <|user|> w0 w1 w2 <|end|> <|assistant|> w10 ... w13 <|end|>
    expected = [user] + word_ids(tokenizer, 0, 3) + [end, assistant] + word_ids(tokenizer, 10, 14) + [end]
    assert ids == expected


def test_text_format_auto():
    assert RewardEncoder(tiny_tokenizer(chat_template=True)).text_format == "chat"
    assert RewardEncoder(tiny_tokenizer(chat_template=False)).text_format == "plain"


def test_truncation_keeps_response_end():
    tokenizer = tiny_tokenizer()
    encoder = RewardEncoder(tokenizer, max_length=30, max_prompt_length=10, text_format="plain")
    prompt, response = words(0, 20), words(100, 140)

    ids = encode_plain(encoder, prompt, response)

    # the prompt keeps its last 10 tokens, the response its first 10 and its last 10
    full = word_ids(tokenizer, 0, 20) + word_ids(tokenizer, 100, 140)
    assert len(ids) == 30, f"{len(ids)} tokens after truncation to 30"
    assert ids[-10:] == full[-10:], "the end of the response was not kept"
    assert ids[:10] == word_ids(tokenizer, 10, 20), "the prompt did not lose its start"
    assert ids[10:20] == word_ids(tokenizer, 100, 110), "the response did not keep its start"


def test_truncation_prompt_first():
    tokenizer = tiny_tokenizer()
    encoder = RewardEncoder(tokenizer, max_length=20, max_prompt_length=10, text_format="plain")

    # 30 prompt tokens and 5 response tokens: the response fits, so only the prompt's start goes
    ids = encode_plain(encoder, words(0, 30), words(100, 105))

    full = word_ids(tokenizer, 0, 30) + word_ids(tokenizer, 100, 105)
    assert ids == full[-20:]


def test_truncation_chat_keeps_end():
    tokenizer = tiny_tokenizer()
    encoder = RewardEncoder(tokenizer, max_length=16, text_format="chat")
    prompt, response = words(0, 12), words(100, 130)

    ids = encode_plain(encoder, prompt, response)

    full = encoder.tokenizer(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        ),
        add_special_tokens=False,
    )["input_ids"]
    assert len(full) > 16, f"the untruncated chat encoding has only {len(full)} tokens"
    assert len(ids) == 16, f"{len(ids)} tokens after truncation to 16"
    assert ids[-4:] == full[-4:], "the end of the response and its end-of-turn token were not kept"


def test_short_text_not_truncated():
    tokenizer = tiny_tokenizer()
    encoder = RewardEncoder(tokenizer, max_length=8, text_format="plain")

    ids = encode_plain(encoder, words(0, 4), words(100, 104))

    assert ids == word_ids(tokenizer, 0, 4) + word_ids(tokenizer, 100, 104)


def test_encode_pairs_identical_after_truncation():
    encoder = RewardEncoder(tiny_tokenizer(), max_length=24, max_prompt_length=4, text_format="plain")
    prompt = words(0, 8)
    # 40-token responses keep their first 10 and last 10 tokens, so w120 is in the dropped middle
    chosen = words(100, 140)
    middle_differs = chosen.replace("w120", "w199")
    end_differs = chosen.replace("w139", "w199")

    encoded, skipped = encoder.encode_pairs([pair(prompt, chosen, middle_differs, row=0), pair(prompt, chosen, end_differs, row=1)])

    assert skipped["identical_after_truncation"] == 1, f"skip counts {dict(skipped)}"
    assert [item.row for item in encoded] == [1], f"kept rows {[item.row for item in encoded]}"
    assert encoded[0].chosen_ids != encoded[0].rejected_ids, "the kept pair has identical responses"


def test_messages_without_template_raise():
    encoder = RewardEncoder(tiny_tokenizer(chat_template=False), text_format="plain")

    with pytest.raises(UmmrmError, match=r"prompts as message lists, but the model's tokenizer has no chat template"):
        encoder.encode(({"role": "user", "content": "w1"},), "", "w2", messages_only=True)


@pytest.mark.parametrize(
    ("tokenizer_options", "encoder_options", "message"),
    [
        ({"chat_template": False}, {"text_format": "chat"}, r"text_format='chat' needs a chat template"),
        ({}, {"text_format": "markdown"}, r"text_format='markdown' is invalid; choose one of auto, chat, plain"),
        ({}, {"max_length": 7}, r"max_length=7 is too small"),
        ({}, {"max_length": 16, "max_prompt_length": 16}, r"max_prompt_length=16 is invalid: it must be between 0 and 15"),
        ({}, {"max_length": 16, "max_prompt_length": -1}, r"max_prompt_length=-1 is invalid"),
        ({"pad": False}, {}, r"the tokenizer has no pad token"),
    ],
)
def test_encoder_invalid_settings(tokenizer_options, encoder_options, message):
    tokenizer = tiny_tokenizer(**tokenizer_options)

    with pytest.raises(UmmrmError, match=message):
        RewardEncoder(tokenizer, **encoder_options)


def test_response_survives_long_prompt_limit():
    # the largest valid max_prompt_length still leaves one response token, the one whose reward is read
    tokenizer = tiny_tokenizer()
    encoder = RewardEncoder(tokenizer, max_length=16, max_prompt_length=15, text_format="plain")

    ids = encode_plain(encoder, words(0, 30), words(100, 110))

    assert len(ids) == 16, f"{len(ids)} tokens after truncation to 16"
    assert ids[-1] == word_ids(tokenizer, 109, 110)[0], "the last response token was dropped"


def test_pad_text_is_read_as_characters():
    # load_tokenizer adds the pad token outside the vocabulary. Its string in a text is then ordinary
    # characters (here one unknown word), so the pad id never reaches the model.
    tokenizer = tiny_tokenizer(pad=False)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    encoder = RewardEncoder(tokenizer, max_length=64, text_format="plain")

    ids = encode_plain(encoder, words(0, 3), "w10 <|pad|> w11")

    assert ids == word_ids(tokenizer, 0, 3) + word_ids(tokenizer, 10, 11) + [tokenizer.unk_token_id] + word_ids(tokenizer, 11, 12)


def test_pad_text_is_read_as_characters_when_truncated():
    tokenizer = tiny_tokenizer(pad=False)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    encoder = RewardEncoder(tokenizer, max_length=8, max_prompt_length=2, text_format="plain")

    ids = encode_plain(encoder, words(0, 10), "w10 <|pad|> w11")

    # 10 prompt tokens and 3 response tokens: the prompt keeps its last 8 - 3 = 5
    assert ids == word_ids(tokenizer, 5, 10) + word_ids(tokenizer, 10, 11) + [tokenizer.unk_token_id] + word_ids(tokenizer, 11, 12)


def test_pad_in_vocabulary_cannot_be_read_as_characters():
    # here "<pad>" is a vocabulary word, so its characters give the pad id again
    encoder = RewardEncoder(tiny_tokenizer(), max_length=64, text_format="plain")

    with pytest.raises(UmmrmError, match=r"the pad token '<pad>' cannot be encoded as plain text"):
        encode_plain(encoder, words(0, 3), "w10 <pad> w11")


def test_describe_reports_settings():
    tokenizer = tiny_tokenizer()

    description = RewardEncoder(tokenizer, max_length=32, text_format="chat").describe()

    assert description == {
        "text_format": "chat",
        "chat_template": CHAT_TEMPLATE,
        "max_length": 32,
        "max_prompt_length": 16,
        "pad_token": "<pad>",
    }
