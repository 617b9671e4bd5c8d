"""The systems the end-to-end benchmark compares, each made from the one model in memory.

Models of the size this benchmark is for (tens of GB) can be held once, not once per system, so
the systems are visited in an order that moves the expert weights instead of copying them:

1. ``resident``: every weight on the GPU, transformers' fastest experts implementation (timed on
   the bench's own prompt); ``resident_graphed``: the same model decoded by the graphed greedy loop
   (CUDA only), with the fastest implementation that can be captured;
2. ``accelerate_cpu``: transformers + accelerate with the experts offloaded to the CPU (weights
   copied to the GPU on every forward, synchronously);
3. after ``offload``: the sida-moe engine in every (budget, policy, predictor) configuration, plus
   two baselines built from the same engine: ``ondemand_lru`` (no prefetch, LRU: the
   mixtral-offloading design) and ``sida_sync`` (the SiDA paper's synchronous loading: the host
   waits for each layer's copies before computing, FIFO eviction).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from sida_moe.adapters import adapter_for
from sida_moe.sampling import SamplingParams


def expert_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the (original, not yet offloaded) experts modules."""
    adapter = adapter_for(model)
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer.experts)] for layer in adapter.find_layers(model)]


def set_fastest_experts_implementation(
    model: nn.Module, probe: Callable[[], float | None] | None = None, candidates: list[str] | None = None
) -> tuple[str, dict[str, float]]:
    """Select transformers' fastest experts implementation for this model and machine; returns the
    one in use and each candidate's cost.

    Candidates: grouped_mm and batched_mm on a GPU, then eager. With ``probe`` (a short generation)
    each candidate that runs is measured after one warm-up call: the cost is what ``probe`` returns
    (e.g. seconds per decoded token), or its wall time when it returns None. The cheapest is kept:
    which one wins depends on the shapes (small decode batches can favour batched_mm by several
    times). Without ``probe``, the first candidate that can be set is kept."""
    setter = getattr(model, "set_experts_implementation", None)
    if setter is None:
        return "eager", {}
    device = next(model.parameters()).device
    if candidates is None:
        candidates = (["grouped_mm", "batched_mm"] if device.type == "cuda" else []) + ["eager"]
    timings: dict[str, float] = {}
    for impl in candidates:
        try:
            setter(impl)
            if probe is None:
                return impl, timings
            probe()  # warm-up: kernel selection, allocator
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            cost = probe()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings[impl] = float(cost) if cost is not None else time.perf_counter() - t0
        except (ValueError, ImportError, RuntimeError, NotImplementedError):
            continue
    best = min(timings, key=timings.get) if timings else "eager"
    setter(best)
    return best, timings


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


class GraphedResident:
    """``resident_graphed``: transformers' all-resident model decoded by the graphed greedy loop
    (``sida_moe.decode_graph``: StaticCache, the decode step captured in one CUDA graph and
    replayed). A captured step replays the experts implementation it was captured with, so a
    change of implementation captures again."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._captured_with: str | None = None

    def generate(self, input_ids: torch.Tensor, new_tokens: int, compile: bool = False,
                 sampling: SamplingParams | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The ``[B, new_tokens]`` ids after ``input_ids`` (left-padded where ``attention_mask``
        has zeros), greedy or drawn with ``sampling``, the step compiled first with ``compile``."""
        from sida_moe.decode_graph import forget_captured_steps, static_generate

        impl = getattr(self.model.config, "_experts_implementation", None)
        if impl != self._captured_with:
            forget_captured_steps(self.model)
            self._captured_with = impl
        return static_generate(self.model, input_ids, new_tokens, graphs=True, compile=compile,
                               sampling=sampling, attention_mask=attention_mask)[:, input_ids.shape[1]:]
