"""The module that replaces a model's experts module once its weights live in the pinned pool,
and the custom op ``sida_moe::offloaded_experts`` that ``torch.compile`` sees in its place."""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from sida_moe.adapters.base import MoELayer
    from sida_moe.engine import OffloadEngine

# engines by handle: a custom op takes tensors and scalars, not the engine itself
_ENGINES: weakref.WeakValueDictionary[int, OffloadEngine] = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def register_engine(engine: OffloadEngine) -> int:
    """The handle under which the custom op finds ``engine`` (kept only while the engine lives)."""
    handle = next(_HANDLES)
    _ENGINES[handle] = engine
    return handle


@torch.library.custom_op("sida_moe::offloaded_experts", mutates_args=())
def offloaded_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                      engine: int, moe_layer: int) -> torch.Tensor:
    """One MoE layer's experts through its engine (``OffloadEngine.run_layer``). Opaque to
    ``torch.compile``: the engine's bookkeeping (the routing ring, the cache's visits, slot
    acquisition in prefill) stays in Python and native code, and the compiled graph around it
    fuses the dense part of the model."""
    found = _ENGINES.get(engine)
    if found is None:
        raise RuntimeError(f"sida_moe::offloaded_experts: no live engine with handle {engine} (the model's "
                           "engine was closed)")
    return found.run_layer(moe_layer, hidden, topk_ids, topk_weights)


@offloaded_experts.register_fake
def _(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, engine: int, moe_layer: int) -> torch.Tensor:
    return torch.empty_like(hidden)


class OffloadedExperts(nn.Module):
    """Drop-in for a Hugging Face experts module: same forward signature
    ``(hidden [T, H], routing, weights) -> [T, H]``, weights served by an :class:`OffloadEngine`.

    ``routing``/``weights`` are what the family's MoE block passes (top-k ids and weights, or Switch's
    one-hot dispatch mask and router probability); the adapter turns them into ids/weights. Holds no
    parameters: the experts' bytes are in the engine's pinned pool and GPU slots. Under
    ``torch.compile`` the layer is one call of the custom op ``sida_moe::offloaded_experts``.
    """

    def __init__(self, engine: OffloadEngine, layer: MoELayer) -> None:
        super().__init__()
        self.engine = engine
        self.moe_layer = layer.ordinal
        self.num_experts = layer.num_experts
        self.top_k = layer.top_k
        self._read_routing = layer.adapter.read_routing

    def forward(self, hidden_states: torch.Tensor, routing: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ids, topk_weights = self._read_routing(routing, weights)
        if torch.compiler.is_compiling():
            return offloaded_experts(hidden_states, ids, topk_weights, self.engine.handle, self.moe_layer)
        return self.engine.run_layer(self.moe_layer, hidden_states, ids, topk_weights)

    def extra_repr(self) -> str:
        return f"moe_layer={self.moe_layer}, num_experts={self.num_experts}, top_k={self.top_k}, offloaded"
