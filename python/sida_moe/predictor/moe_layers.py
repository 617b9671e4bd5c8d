"""MoE blocks of a transformers model as the predictor sees them: each block's router and experts
modules, its number of experts and top-k (``find_moe_layers``), used when serving (hash routing)
and when recording routing traces to train on."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class MoELayer:
    """One MoE block of a model: its router and experts modules and their sizes."""

    index: int  # ordinal among MoE layers (0..L-1)
    decoder_layer: int  # index of the decoder layer that holds it
    name: str  # module path of the MoE block
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int


def _config_value(config: object, *names: str) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """MoE blocks of a transformers model, in forward order.

    A block is a module with an ``experts`` child and a ``gate`` or ``router`` child. Raises
    ``ValueError`` when the model has none and ``NotImplementedError`` for encoder-decoder models.
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError(
            f"the predictor serves decoder-only MoE LMs; {type(model).__name__} is an encoder-decoder model"
        )
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers: list[MoELayer] = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        router = getattr(module, "gate", None)
        if not isinstance(router, nn.Module):
            router = getattr(module, "router", None)
        if not isinstance(experts, nn.Module) or not isinstance(router, nn.Module):
            continue
        num_experts = (
            getattr(experts, "num_experts", None)
            or getattr(router, "num_experts", None)
            or _config_value(text_config, "num_experts", "num_local_experts", "n_routed_experts")
        )
        if num_experts is None and getattr(router, "weight", None) is not None:
            num_experts = router.weight.shape[0]
        top_k = getattr(router, "top_k", None) or _config_value(
            text_config, "num_experts_per_tok", "top_k", "moe_topk", "num_experts_per_token"
        )
        if not num_experts or not top_k:
            raise ValueError(f"cannot tell the number of experts / top-k of MoE block {name!r}")
        m = _LAYER_INDEX.search(f".{name}.")
        decoder_layer = int(m.group(1)) if m else len(layers)
        layers.append(MoELayer(len(layers), decoder_layer, name, module, router, experts, int(num_experts), int(top_k)))
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no MoE blocks (modules with an 'experts' child and a 'gate' or 'router' child)"
        )
    return layers


__all__ = ["MoELayer", "find_moe_layers"]
