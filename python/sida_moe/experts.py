"""The module that replaces a model's experts module once its weights live in the pinned pool."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from sida_moe.adapters.base import MoELayer
    from sida_moe.engine import OffloadEngine


class OffloadedExperts(nn.Module):
    """Drop-in for a Hugging Face experts module: same forward signature
    ``(hidden [T, H], routing, weights) -> [T, H]``, weights served by an :class:`OffloadEngine`.

    ``routing``/``weights`` are what the family's MoE block passes (top-k ids and weights, or Switch's
    one-hot dispatch mask and router probability); the adapter turns them into ids/weights. Holds no
    parameters: the experts' bytes are in the engine's pinned pool and GPU slots.
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
        return self.engine.run_layer(self.moe_layer, hidden_states, ids, topk_weights)

    def extra_repr(self) -> str:
        return f"moe_layer={self.moe_layer}, num_experts={self.num_experts}, top_k={self.top_k}, offloaded"
