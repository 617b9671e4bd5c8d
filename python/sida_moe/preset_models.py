"""The models of the built-in presets (``sida_moe.presets``), with random weights and no downloads.

``build_offloaded(name, ...)`` creates the dense part on the target device and writes every expert
straight into the pinned pool layer by layer (one layer of experts is materialised at a time), so
a preset larger than the GPU (``qwen3-30b-a3b``: 48 layers x 128 experts, 58 GB of bf16 experts)
builds on one GPU of 80 GB. ``build_model(name, ...)`` makes the ordinary all-resident model (the
reference the offloaded one is compared with).
"""

from __future__ import annotations

import torch
from torch import nn

from sida_moe.budget import BudgetSpec
from sida_moe.presets import get_preset, preset_config


def _init_dense_(model: nn.Module, std: float, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_meta:
                continue
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=generator)
            elif name.endswith("bias"):
                p.zero_()


def build_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                std: float = 0.02) -> nn.Module:
    """The all-resident model of a preset with random weights (normal, ``std``), in eval mode."""
    import transformers

    preset = get_preset(name)
    config = preset_config(name)
    device = torch.device(device)
    with torch.device(device):
        model = getattr(transformers, preset.model_class)._from_config(config, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    _init_dense_(model, std, generator)
    return model.eval()


def build_offloaded(name: str, gpu_budget: BudgetSpec = "25%", device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, policy: str = "lru", prefetch="next_layer_gate",
                    seed: int = 0, std: float = 0.02, backend: str = "auto", progress: bool = False) -> nn.Module:
    """The offloaded model of a preset, built in place: dense weights random on ``device``, experts
    random and written into the pinned pool one layer at a time (never all on the device)."""
    import transformers
    from tqdm.auto import tqdm

    from sida_moe.engine_builder import EngineBuilder, parameters_on_meta
    from sida_moe.serving_config import ServingConfig

    options = ServingConfig.resolve(gpu_budget, policy, prefetch, backend, progress=progress)
    preset = get_preset(name)
    config = preset_config(name)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with parameters_on_meta():
        model = getattr(transformers, preset.model_class)._from_config(config, dtype=dtype)
    builder = EngineBuilder(model, device, options)
    engine, fmt = builder.engine, builder.fmt
    try:
        generator = torch.Generator(device=device).manual_seed(seed)
        shapes = fmt.tensor_shapes()
        for layer in tqdm(builder.layers, desc="building experts", unit="layer", disable=not options.progress):
            # one layer of experts at a time, generated on the device, then copied to the host once
            host = {n: torch.empty((layer.num_experts, *s), dtype=dtype, device=device).normal_(0.0, std, generator=generator).cpu()
                    for n, s in shapes.items()}
            for expert in range(layer.num_experts):
                engine.write_expert(layer.ordinal, expert, {n: t[expert] for n, t in host.items()})
        builder.replace_experts()
        # dense part: materialise the remaining meta parameters on the device
        for pname, param in list(model.named_parameters()):
            if param.is_meta:
                mod_name, _, attr = pname.rpartition(".")
                module = model.get_submodule(mod_name) if mod_name else model
                module._parameters[attr] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=False)
        for bname, buf in list(model.named_buffers()):
            mod_name, _, attr = bname.rpartition(".")
            module = model.get_submodule(mod_name) if mod_name else model
            module._buffers[attr] = buf.to(device)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if pname.endswith("norm.weight") or "layernorm" in pname or pname.endswith("layer_norm.weight"):
                    param.fill_(1.0)
                elif param.dim() >= 2:
                    param.normal_(0.0, std, generator=generator)
                else:
                    param.zero_()
        model.tie_weights()
        return builder.start().eval()
    except BaseException:
        builder.abandon()
        raise


__all__ = ["build_model", "build_offloaded"]
