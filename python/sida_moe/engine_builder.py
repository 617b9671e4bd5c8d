"""The build sequence of an offloaded model's engine, the same for every source of expert weights:
a loaded model (``offload``), safetensors files (``from_pretrained``), a preset's random weights
(``preset_models.build_offloaded``).

1. ``EngineBuilder(model, device, config)`` with the options resolved once
   (``ServingConfig.resolve``): the model's MoE layers found (``discover``), the engine and its
   pinned pool made, the budget's slot count checked against the model;
2. the source writes every expert (``builder.engine.write_expert``), then ``replace_experts()``
   puts an :class:`~sida_moe.experts.OffloadedExperts` in place of each experts module;
3. ``start()``: the slot cache, the prefetcher, the model hooks and the graphed
   ``generate``; the model is returned with its ``sida_engine``.

A failure before ``start`` returns leaves the undoing to the caller: ``abandon()`` closes the
engine (``offload`` first puts the original experts back).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sida_moe.adapters import Adapter, MoELayer, adapter_for, moe_layers_of
from sida_moe.generate_route import install_generate
from sida_moe.engine import OffloadEngine
from sida_moe.experts import OffloadedExperts
from sida_moe.format import ExpertFormat
from sida_moe.serving_config import ServingConfig

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the expert dtypes an engine serves


# ------------------------------------------------------------------------------------ checks
def _check_not_quantized(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    quant = getattr(config, "quantization_config", None) or getattr(model, "hf_quantizer", None)
    if quant:
        method = getattr(quant, "quant_method", None) or (quant.get("quant_method") if isinstance(quant, dict) else None)
        raise NotImplementedError(
            f"quantized models ({method or type(quant).__name__}) are not supported yet: load the model in bf16, fp16 or fp32"
        )


def discover(model: nn.Module) -> tuple[Adapter, list[MoELayer], ExpertFormat]:
    """The family adapter of ``model``, its MoE layers and their one expert format (TypeError,
    ValueError or NotImplementedError for what cannot be offloaded)."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    _check_not_quantized(model)
    adapter = adapter_for(model)
    for _, module in model.named_modules():
        if isinstance(module, OffloadedExperts):
            raise ValueError("this model is already offloaded (it contains OffloadedExperts modules)")
    layers = moe_layers_of(adapter, model)
    fmt = adapter.expert_format(model, layers[0])
    if fmt.dtype not in FLOAT_DTYPES:
        kind = "" if fmt.dtype.is_floating_point else " (quantized)"
        raise NotImplementedError(f"expert weights of dtype {fmt.dtype}{kind} are not supported yet: use bf16, fp16 or fp32")
    for layer in layers[1:]:
        other = adapter.expert_format(model, layer)
        if other != fmt:
            raise ValueError(f"MoE layers disagree on the expert shape/dtype: {layers[0].path} is {fmt}, {layer.path} is {other}")
    return adapter, layers, fmt


# ------------------------------------------------------------------------------------- hooks
def _install_hooks(model: nn.Module, engine: OffloadEngine) -> None:
    """Call ``engine.begin_forward`` once per stack forward with the layer-0 input, and
    ``engine.end_forward`` after it."""
    state: dict[str, object] = {"mask": None, "given": False}
    if getattr(model.config, "is_encoder_decoder", False):
        stacks = [model.get_encoder(), model.get_decoder()]
    else:
        stacks = [model.get_decoder() if hasattr(model, "get_decoder") else model.base_model]

    # the hooks run eagerly in a compiled model (torch.compile breaks its graph around them):
    # they talk to the native cache, which it cannot trace
    @torch.compiler.disable
    def stack_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state["mask"] = kwargs.get("attention_mask")
        embeds = kwargs.get("inputs_embeds")
        state["given"] = embeds is not None
        if embeds is not None:
            engine.begin_forward(embeds, state["mask"])

    @torch.compiler.disable
    def embed_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not state["given"]:
            engine.begin_forward(output, state["mask"])

    embeddings = []
    @torch.compiler.disable
    def stack_post_hook(module: nn.Module, args: tuple, output: object) -> None:
        engine.end_forward()

    for stack in dict.fromkeys(stacks):  # encoder and decoder may be one module
        engine.keep_hook(stack.register_forward_pre_hook(stack_pre_hook, with_kwargs=True))
        engine.keep_hook(stack.register_forward_hook(stack_post_hook))
        # each stack's own embedding (Switch stacks hold embed_tokens apart from model.shared)
        embed = getattr(stack, "embed_tokens", None)
        embeddings.append(embed if isinstance(embed, nn.Module) else model.get_input_embeddings())
    for embed in dict.fromkeys(embeddings):
        engine.keep_hook(embed.register_forward_hook(embed_hook))


class EngineBuilder:
    """One model's engine, built in the steps of the module docstring. ``found``: what
    ``discover(model)`` returned, if the caller needed it first."""

    def __init__(self, model: nn.Module, device: torch.device, config: ServingConfig,
                 found: tuple[Adapter, list[MoELayer], ExpertFormat] | None = None) -> None:
        self.model = model
        self.adapter, self.layers, self.fmt = found if found is not None else discover(model)
        self.config = config
        self.engine = OffloadEngine(self.layers, self.fmt, device, config.backend)
        self.engine.config = config
        try:
            self.num_slots = self.engine.slots_for(config.gpu_budget)
            self.engine.check_cache_args(self.num_slots, config.policy, config.copy_workers)
        except BaseException:
            self.engine.close()
            raise

    def replace_experts(self) -> list[tuple[MoELayer, nn.Module]]:
        """Each layer's experts module replaced by the engine's; returns (layer, original) pairs."""
        swapped = []
        for layer in self.layers:
            swapped.append((layer, layer.experts))
            setattr(layer.block, layer.experts_attr, OffloadedExperts(self.engine, layer))
        return swapped

    def start(self) -> nn.Module:
        """Open the slot cache, attach the config's prefetcher, hook the model and route its
        ``generate``; returns the model, now holding its ``sida_engine``."""
        engine, model, config = self.engine, self.model, self.config
        engine.open_cache(self.num_slots, config.policy, config.copy_workers)
        engine.set_prefetcher(config.prefetcher)
        _install_hooks(model, engine)
        install_generate(model)
        model.sida_engine = engine
        return model

    def abandon(self) -> None:
        """Close the engine of a build that failed (the model, which nobody else holds yet, is dropped)."""
        self.engine.close()


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (buffers stay real: non-persistent ones such as rotary
    frequencies are not in checkpoints)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


__all__ = ["FLOAT_DTYPES", "EngineBuilder", "discover", "parameters_on_meta"]
