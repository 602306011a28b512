"""Upcycling: turning a dense reward model's feed-forward blocks into mixture-of-experts layers.

Every expert starts as a copy of the block's MLP and the routing weights of a token sum to one, so an
unperturbed upcycled model computes what the dense model computes (up to float rounding).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ummrm.errors import UmmrmError
from ummrm.families import decoder_layers, layer_mlp, mlp_family
from ummrm.moe import MoEFeedForward, MoESettings

logger = logging.getLogger(__name__)


def resolve_layers(spec: str | int | list, num_layers: int) -> list[int]:
    """Return the block indices named by ``spec``: ``all``, ``last:N`` (or an integer N), or a list like ``0,5,7``."""
    if isinstance(spec, bool):
        raise UmmrmError(f"layers={spec!r} is invalid; use 'all', 'last:N' or a list of block indices.")
    if isinstance(spec, int):
        spec = f"last:{spec}"
    if isinstance(spec, (list, tuple)):
        indices = [_layer_index(item, spec, num_layers) for item in spec]
    elif isinstance(spec, str) and spec.strip() == "all":
        indices = list(range(num_layers))
    elif isinstance(spec, str) and spec.strip().startswith("last:"):
        count = spec.strip()[len("last:") :]
        if not count.isdigit() or not 1 <= int(count) <= num_layers:
            raise UmmrmError(f"layers={spec!r} is invalid: N in 'last:N' must be between 1 and {num_layers}, the model's block count.")
        indices = list(range(num_layers - int(count), num_layers))
    elif isinstance(spec, str):
        indices = [_layer_index(item, spec, num_layers) for item in spec.split(",") if item.strip()]
    else:
        raise UmmrmError(f"layers={spec!r} is invalid; use 'all', 'last:N' or a list of block indices.")
    if not indices:
        raise UmmrmError(f"layers={spec!r} selects no block; use 'all', 'last:N' or a list of block indices.")
    if len(set(indices)) != len(indices):
        raise UmmrmError(f"layers={spec!r} names a block twice.")
    return sorted(indices)


def _layer_index(item, spec, num_layers: int) -> int:
    text = str(item).strip()
    if not text.lstrip("-").isdigit():
        raise UmmrmError(f"layers={spec!r} is invalid: {text!r} is not a block index; use 'all', 'last:N' or indices like 0,5,7.")
    index = int(text)
    if index < 0:
        index += num_layers
    if not 0 <= index < num_layers:
        raise UmmrmError(f"layers={spec!r} is invalid: block {text} does not exist; the model has blocks 0 to {num_layers - 1}.")
    return index


def validate_settings(num_experts: int, top_k: int, shared_rate: float) -> None:
    if num_experts < 1:
        raise UmmrmError(f"num_experts={num_experts} is invalid; use at least 1 routed expert.")
    if not 1 <= top_k <= num_experts:
        raise UmmrmError(f"top_k={top_k} is invalid; it must be between 1 and num_experts={num_experts}.")
    if not 0.0 <= shared_rate <= 1.0:
        raise UmmrmError(f"shared_rate={shared_rate} is invalid; it is a mixing weight in [0, 1] (0.5 is the usual choice).")


def build_moe_layers(model: nn.Module, settings: MoESettings) -> None:
    """Replace the MLP of each block in ``settings.layers`` by an MoE layer of copies of it, in place."""
    validate_settings(settings.num_experts, settings.num_experts_per_tok, settings.shared_rate)
    layers = decoder_layers(model)
    hidden_size = model.config.get_text_config().hidden_size
    # check every block before replacing any, so that an unsupported block leaves the model dense
    mlps = {index: layer_mlp(layers[index], index) for index in settings.layers}
    for mlp in mlps.values():
        mlp_family(mlp)
    for index, mlp in mlps.items():
        layers[index].mlp = MoEFeedForward(
            mlp, hidden_size, settings.num_experts, settings.num_experts_per_tok, settings.shared_rate
        )
    model.moe_settings = settings


def upcycle(
    model: nn.Module,
    num_experts: int = 4,
    top_k: int = 2,
    shared_rate: float = 0.5,
    layers: str | int | list = "all",
    router_init_std: float = 0.02,
    perturb_fraction: float = 0.0,
    perturb_noise: float = 0.0,
    seed: int = 0,
) -> MoESettings:
    """Upcycle a dense reward model in place and return the settings used.

    ``router_init_std`` is the standard deviation of the router's initial weights (0 gives a uniform
    router). ``perturb_fraction`` re-initialises that fraction of each routed expert's hidden units.
    ``perturb_noise`` adds Gaussian noise of that size relative to each weight's standard deviation.
    Both break the symmetry between experts, so the upcycled model then differs from the dense one.
    All random steps draw from ``seed``.
    """
    if getattr(model, "moe_settings", None) is not None:
        raise UmmrmError("this model is already upcycled; upcycle a dense reward model.")
    if router_init_std < 0:
        raise UmmrmError(f"router_init_std={router_init_std} is invalid; use 0 or a small positive value such as 0.02.")
    if not 0.0 <= perturb_fraction <= 1.0:
        raise UmmrmError(f"perturb_fraction={perturb_fraction} is invalid; it is a fraction of hidden units in [0, 1].")
    if perturb_noise < 0:
        raise UmmrmError(f"perturb_noise={perturb_noise} is invalid; use 0 (no noise) or a small positive value.")

    blocks = decoder_layers(model)
    indices = resolve_layers(layers, len(blocks))
    mlp_class = type(layer_mlp(blocks[indices[0]], indices[0])).__name__
    settings = MoESettings(
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        shared_rate=shared_rate,
        layers=indices,
        mlp_class=mlp_class,
        router_init_std=router_init_std,
        perturb_fraction=perturb_fraction,
        perturb_noise=perturb_noise,
        seed=seed,
    )
    build_moe_layers(model, settings)

    generator = torch.Generator().manual_seed(seed)
    for index in indices:
        moe = blocks[index].mlp
        with torch.no_grad():
            if router_init_std > 0:
                nn.init.normal_(moe.router.weight, std=router_init_std, generator=generator)
            else:
                moe.router.weight.zero_()
            for expert in moe.experts:
                perturb_expert(expert, perturb_fraction, perturb_noise, generator)
    logger.info(
        "upcycled blocks %s into %d experts (top-%d, shared rate %.2f)", indices, num_experts, top_k, shared_rate
    )
    return settings


@torch.no_grad()
def perturb_expert(expert: nn.Module, fraction: float, noise: float, generator: torch.Generator) -> None:
    """Re-initialise a fraction of an expert's hidden units and add relative Gaussian noise to its weights."""
    if fraction == 0 and noise == 0:
        return
    family = mlp_family(expert)
    parameters = dict(expert.named_parameters())
    intermediate_size = next(
        parameters[name].shape[axis] for name, axis in family.intermediate_axes.items() if name in parameters
    )
    count = int(round(fraction * intermediate_size))
    units = torch.randperm(intermediate_size, generator=generator)[:count]

    for name, tensor in parameters.items():
        std = tensor.float().std().item() if tensor.numel() > 1 else 0.0
        axis = family.intermediate_axes.get(name)
        if count and axis is not None:
            # drop-upcycling style: fresh values with the statistics of the original tensor
            shape = list(tensor.shape)
            shape[axis] = count
            fresh = torch.randn(shape, generator=generator) * std + tensor.float().mean().item()
            tensor.index_copy_(axis, units, fresh.to(tensor.dtype))
        if noise:
            tensor.add_((torch.randn(tensor.shape, generator=generator) * noise * std).to(tensor.dtype))
