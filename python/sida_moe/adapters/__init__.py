"""Architecture adapters and their registry: ``adapter_for(model)`` picks the one serving a model;
``decoder_moe_layers(model)`` is its MoE layers as the predictor hooks them."""

from __future__ import annotations

from torch import nn

from sida_moe.adapters.base import Adapter, CheckpointPiece, MoELayer
from sida_moe.adapters.deepseek_v3 import DeepseekV3Adapter
from sida_moe.adapters.gpt_oss import GptOssAdapter
from sida_moe.adapters.mixtral import MixtralAdapter
from sida_moe.adapters.olmoe import OlmoeAdapter
from sida_moe.adapters.qwen2_moe import Qwen2MoeAdapter
from sida_moe.adapters.qwen3_moe import Qwen3MoeAdapter
from sida_moe.adapters.switch import SwitchAdapter

_REGISTRY: list[Adapter] = [
    MixtralAdapter(),
    Qwen2MoeAdapter(),
    Qwen3MoeAdapter(),
    OlmoeAdapter(),
    DeepseekV3Adapter(),
    GptOssAdapter(),
    SwitchAdapter(),
]


def register_adapter(adapter: Adapter) -> None:
    """Add an adapter (checked before the built-in ones)."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"expected an Adapter instance, got {type(adapter).__name__}")
    _REGISTRY.insert(0, adapter)


def supported_model_types() -> list[str]:
    return sorted({t for a in _REGISTRY for t in a.model_types})


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter serving ``model`` (by ``config.model_type``); ValueError naming the supported
    architectures otherwise."""
    for adapter in _REGISTRY:
        if adapter.matches(model):
            return adapter
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise ValueError(
        f"unsupported architecture {model_type or type(model).__name__!r}; "
        f"supported model types: {', '.join(supported_model_types())}"
    )


def decoder_moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of a decoder-only model, in forward order, as its adapter finds them (on an
    offloaded model: its engine's layers). NotImplementedError for encoder-decoder models (the
    predictor reads one stack); ValueError for an unsupported architecture or no MoE blocks."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise NotImplementedError(
            f"the predictor serves decoder-only MoE LMs; {type(model).__name__} is an encoder-decoder model"
        )
    engine = getattr(model, "sida_engine", None)
    if engine is not None:
        # offloading swapped the experts modules for weightless ones find_layers cannot recognise
        return list(engine.moe_layers)
    try:
        adapter = adapter_for(model)
    except ValueError as e:
        raise ValueError(f"no MoE blocks found in {type(model).__name__}: {e}") from None
    return moe_layers_of(adapter, model)


def moe_layers_of(adapter: Adapter, model: nn.Module) -> list[MoELayer]:
    """``adapter.find_layers(model)``; ValueError when it finds none."""
    layers = adapter.find_layers(model)
    if not layers:
        raise ValueError(f"no MoE blocks found in this {adapter.name} model ({type(model).__name__}): "
                         "are its experts a supported module type?")
    return layers


__all__ = [
    "Adapter",
    "CheckpointPiece",
    "MoELayer",
    "adapter_for",
    "decoder_moe_layers",
    "moe_layers_of",
    "register_adapter",
    "supported_model_types",
]
