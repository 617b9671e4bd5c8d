"""Prefetchers: decide which experts to copy to the GPU before a layer asks for them.

A prefetcher is attached to one :class:`~sida_moe.engine.OffloadEngine` and is called by it at three
points of every model forward:

1. ``begin_forward(inputs_embeds, attention_mask)`` once, with the layer-0 input, before any layer
   runs (SiDA's hash function predicts every layer's experts from here);
2. ``route(moe_layer, hidden, topk_ids, topk_weights)`` in every MoE layer right after its router:
   the ids/weights returned are the ones used (identity in exact mode; SiDA's hash routing replaces
   them);
3. ``after_routing(moe_layer, hidden, topk_ids)`` right after the layer's experts were pinned, with
   the true routing (used to prefetch the next layers and to score predictions).

What a prefetcher may use on the engine: ``engine.moe_layers`` (ordinal, num_experts, top_k,
router module, ``predict(hidden)``), ``engine.prefetch(moe_layer, experts, priority, generation)``,
``engine.cancel_before(generation)``, ``engine.set_future(visits, offset)``, ``engine.generation``
(incremented once per model forward), ``engine.num_slots``, ``engine.num_experts_total`` and, during
``after_routing``, ``engine.routed_experts`` (host list of the distinct experts the layer uses).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from sida_moe.engine import OffloadEngine


@runtime_checkable
class Prefetcher(Protocol):
    """What the engine calls; implemented by :class:`NoPrefetch`, :class:`NextLayerGate` and the SiDA
    predictor (``sida_moe.predictor``)."""

    name: str

    def attach(self, engine: OffloadEngine) -> None:
        """Bind to the engine (called once by ``offload``); keep what later calls need."""

    def begin_forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Called once per model forward with the layer-0 input before any layer runs.

        ``inputs_embeds`` is ``[B, S, H]`` (the tokens of this forward only: during cached decode
        S == 1); ``attention_mask`` is the 2-D mask the model was called with (it covers past tokens
        too during cached decode) or None.
        """

    def after_routing(self, moe_layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor) -> None:
        """Called in MoE layer `moe_layer` after its router chose experts (true routing known).

        ``hidden`` is the ``[T, H]`` input of the layer's experts, ``topk_ids`` ``[T, k]``.
        """

    def route(
        self, moe_layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hash-routing hook: return the ids/weights to use (identity in exact mode)."""

    def close(self) -> None:
        """Release threads / buffers; called by ``OffloadEngine.close``."""


class NoPrefetch:
    """Loads only on demand: every miss is paid when the layer asks for it."""

    name = "none"

    def attach(self, engine: OffloadEngine) -> None:
        self._engine = engine

    def begin_forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        return None

    def after_routing(self, moe_layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor) -> None:
        return None

    def route(
        self, moe_layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_ids, topk_weights

    def close(self) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return {}


class NextLayerGate:
    """After layer L's router, apply layer L+1's router to the current hidden state and prefetch
    the experts it picks.

    Needs no training. Costs one router call and one host sync per layer; it is skipped when the
    cache holds every expert (nothing left to prefetch). Its syncs cannot be captured, so in a
    decode step replayed from a CUDA graph it does nothing (it still prefetches for prompts and
    for eager decode steps). Its hit rate (fraction of the experts layer
    L+1 really used that were predicted) and precision are counted on the host from the expert
    lists the engine already has (``engine.routed_experts``) and read by ``metrics()``.
    """

    name = "next_layer_gate"

    def __init__(self, lookahead: int = 1) -> None:
        if not isinstance(lookahead, int) or lookahead < 1:
            raise ValueError(f"lookahead must be an int >= 1, got {lookahead!r}")
        self.lookahead = lookahead
        self._engine: OffloadEngine | None = None
        self._pending: dict[int, set[int]] = {}  # moe_layer -> experts predicted for it
        self.reset_metrics()

    def attach(self, engine: OffloadEngine) -> None:
        self._engine = engine
        self._pending.clear()
        self._active = engine.num_slots < engine.num_experts_total

    def begin_forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        # predictions made for the previous forward's layers are not scored against this one
        self._pending.clear()

    def after_routing(self, moe_layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor) -> None:
        engine = self._engine
        if engine is None:
            raise RuntimeError("NextLayerGate.after_routing called before attach()")
        if not self._active:
            return
        predicted = self._pending.pop(moe_layer, None)
        if predicted is not None:
            used = set(engine.routed_experts)
            self._hits += len(used & predicted)
            self._needed += len(used)
        layers = engine.moe_layers
        for ahead in range(1, self.lookahead + 1):
            nxt = moe_layer + ahead
            # only layers of the same stack (encoder vs decoder) see this hidden state next
            if nxt >= len(layers) or layers[nxt].stack != layers[moe_layer].stack:
                break
            experts = torch.unique(layers[nxt].predict(hidden)).tolist()  # one sync: the queue takes host ids
            if ahead == 1:
                self._pending[nxt] = set(experts)
                self._predicted += len(experts)
            engine.prefetch(nxt, experts, priority="prefetch", generation=engine.generation)

    def route(
        self, moe_layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_ids, topk_weights

    def metrics(self) -> dict[str, float]:
        """``hit_rate``: predicted-and-used / used experts of the scored layers; ``precision``:
        predicted-and-used / predicted; ``scored_experts``: used experts scored."""
        return {
            "hit_rate": self._hits / self._needed if self._needed else 0.0,
            "precision": self._hits / self._predicted if self._predicted else 0.0,
            "scored_experts": float(self._needed),
        }

    def reset_metrics(self) -> None:
        self._hits = self._needed = self._predicted = 0

    def close(self) -> None:
        self._pending.clear()
        self._engine = None


def make_prefetcher(spec: str | Prefetcher | None) -> Prefetcher:
    """``"none"`` / None -> :class:`NoPrefetch`, ``"next_layer_gate"`` -> :class:`NextLayerGate`,
    or a ready :class:`Prefetcher` instance (returned as is)."""
    if spec is None or spec == "none":
        return NoPrefetch()
    if spec == "next_layer_gate":
        return NextLayerGate()
    if isinstance(spec, str):
        raise ValueError(f"unknown prefetch {spec!r}; use 'none', 'next_layer_gate' or a Prefetcher instance")
    missing = [m for m in ("attach", "begin_forward", "after_routing", "route", "close") if not callable(getattr(spec, m, None))]
    if missing or not isinstance(getattr(spec, "name", None), str):
        raise TypeError(
            f"prefetch must be 'none', 'next_layer_gate' or an object implementing the Prefetcher protocol "
            f"(name, attach, begin_forward, after_routing, route, close); {type(spec).__name__} lacks "
            f"{missing or ['name']}"
        )
    return spec


__all__ = ["NextLayerGate", "NoPrefetch", "Prefetcher", "make_prefetcher"]
