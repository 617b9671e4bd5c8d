"""The systems the end-to-end benchmark compares, each made from the one model in memory.

Models of the size this benchmark is for (tens of GB) can be held once, not once per system, so
the systems are visited in an order that moves the expert weights instead of copying them:

1. ``resident``: every weight on the GPU, transformers' fastest experts implementation;
2. ``accelerate_cpu``: transformers + accelerate with the experts offloaded to the CPU (weights
   copied to the GPU on every forward, synchronously);
3. after ``offload``: the sida-moe engine in every (budget, policy, predictor) configuration, plus
   two baselines built from the same engine: ``ondemand_lru`` (no prefetch, LRU: the
   mixtral-offloading design) and ``sida_sync`` (the SiDA paper's synchronous loading: the host
   waits for each layer's copies before computing, FIFO eviction).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from sida_moe.adapters import adapter_for


def expert_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the (original, not yet offloaded) experts modules."""
    adapter = adapter_for(model)
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer.experts)] for layer in adapter.find_layers(model)]


def set_fastest_experts_implementation(model: nn.Module) -> str:
    """Select transformers' fastest experts implementation available (grouped_mm on a GPU, measured
    fastest in design.md); returns the one in use."""
    setter = getattr(model, "set_experts_implementation", None)
    if setter is None:
        return "eager"
    device = next(model.parameters()).device
    for impl in (["grouped_mm", "batched_mm"] if device.type == "cuda" else []) + ["eager"]:
        try:
            setter(impl)
            return impl
        except (ValueError, ImportError, RuntimeError):
            continue
    return "eager"


def _device_map(model: nn.Module, cpu_modules: set[str], device: torch.device) -> dict[str, str]:
    """A device map sending ``cpu_modules`` to "cpu" and everything else to ``device``: modules
    that contain an experts module are split into their children."""
    dev = str(device)
    out: dict[str, str] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        if prefix in cpu_modules:
            out[prefix] = "cpu"
            return
        if prefix and not any(c.startswith(prefix + ".") for c in cpu_modules):
            out[prefix] = dev  # no experts inside: the whole subtree on the device
            return
        for pname, _ in module.named_parameters(recurse=False):
            out[f"{prefix}.{pname}" if prefix else pname] = dev
        for bname, _ in module.named_buffers(recurse=False):
            out[f"{prefix}.{bname}" if prefix else bname] = dev
        for cname, child in module.named_children():
            visit(f"{prefix}.{cname}" if prefix else cname, child)

    visit("", model)
    return out


@contextlib.contextmanager
def experts_on_cpu_with_accelerate(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Inside the block, ``model`` runs as accelerate's CPU offload of its experts; on exit the hooks
    are removed and the expert weights are back on ``device``."""
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_module

    names = expert_module_names(model)
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        module = model.get_submodule(name)
        module.to("cpu")
        saved[name] = {k: v for k, v in module.named_parameters(recurse=True)}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dispatch_model(model, device_map=_device_map(model, set(names), device), main_device=str(device))
    try:
        yield model
    finally:
        remove_hook_from_module(model, recurse=True)
        for name, params in saved.items():
            module = model.get_submodule(name)
            for pname, tensor in params.items():
                owner_name, _, attr = pname.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                owner._parameters[attr] = nn.Parameter(tensor.to(device), requires_grad=False)
        if hasattr(model, "hf_device_map"):
            del model.hf_device_map
