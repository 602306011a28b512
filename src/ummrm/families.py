"""The feed-forward (MLP) blocks that ummrm can upcycle and merge, and how to find them in a model.

Two shapes are supported:

- gated MLP of the Llama family, ``down(act(gate(h)) * up(h))``: Llama, TinyLlama, SmolLM2, Mistral,
  Qwen2 and dense Qwen3;
- two-matrix MLP, ``out(act(in(h)))``: GPT-NeoX/Pythia and GPT-2.

Upcycling copies the MLP module itself and calls it, so the forward pass needs nothing per family. The
table below is only needed to perturb experts, which must know along which axis of each weight the
intermediate (hidden-unit) dimension lies.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ummrm.errors import UmmrmError


@dataclass(frozen=True)
class MLPFamily:
    """Weight layout of one MLP class."""

    name: str
    # parameter name -> axis of the intermediate dimension, for the tensors that have one. Biases of
    # the output projection live on the hidden axis and are left out.
    intermediate_axes: dict[str, int]


GATED = MLPFamily(
    name="gated",
    intermediate_axes={
        "gate_proj.weight": 0,
        "gate_proj.bias": 0,
        "up_proj.weight": 0,
        "up_proj.bias": 0,
        "down_proj.weight": 1,
    },
)
GPT_NEOX = MLPFamily(
    name="two-matrix",
    intermediate_axes={"dense_h_to_4h.weight": 0, "dense_h_to_4h.bias": 0, "dense_4h_to_h.weight": 1},
)
# GPT-2 stores its projections as Conv1D, whose weight is (in_features, out_features).
GPT2 = MLPFamily(
    name="two-matrix",
    intermediate_axes={"c_fc.weight": 1, "c_fc.bias": 0, "c_proj.weight": 0},
)

SUPPORTED_MLP_CLASSES: dict[str, MLPFamily] = {
    "LlamaMLP": GATED,
    "MistralMLP": GATED,
    "Qwen2MLP": GATED,
    "Qwen3MLP": GATED,
    "GPTNeoXMLP": GPT_NEOX,
    "GPT2MLP": GPT2,
}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the list of transformer blocks of a Hugging Face model (Llama-style ``layers`` or GPT-2's ``h``)."""
    backbone = getattr(model, "base_model", model)
    for name in ("layers", "h"):
        layers = getattr(backbone, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise UmmrmError(
        f"cannot find the transformer blocks of {type(model).__name__}: expected a `layers` or `h` module list "
        f"on its backbone {type(backbone).__name__}. Supported MLP classes: {supported_classes_text()}."
    )


def mlp_family(mlp: nn.Module) -> MLPFamily:
    """Return the family of an MLP module, or raise an error naming its class and the supported ones."""
    family = SUPPORTED_MLP_CLASSES.get(type(mlp).__name__)
    if family is None:
        raise UmmrmError(
            f"unsupported feed-forward block {type(mlp).__name__}: ummrm can upcycle and merge "
            f"{supported_classes_text()}. Use a model of one of those families."
        )
    return family


def layer_mlp(layer: nn.Module, index: int) -> nn.Module:
    """Return the feed-forward module (``mlp``) of one transformer block."""
    mlp = getattr(layer, "mlp", None)
    if mlp is None:
        raise UmmrmError(
            f"transformer block {index} ({type(layer).__name__}) has no `mlp` module; ummrm can upcycle and "
            f"merge {supported_classes_text()}."
        )
    return mlp


def supported_classes_text() -> str:
    return ", ".join(SUPPORTED_MLP_CLASSES)
