"""The acquire path of a MoE layer call (prefill, and any call too wide for the expert table):
the routed experts' slots are acquired from the cache in chunks of at most ``num_slots``
distinct experts, each chunk computed through a routing table (slot of each expert) and
released."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from sida_moe import _native
from sida_moe.engine_observer import EngineObserver
from sida_moe.format import ExpertFormat, SlotWeights
from sida_moe.kernels import fused_experts


class AcquirePath:
    """Per-layer routing tables (slot of each expert, -1: not in this chunk) and the chunked
    acquire-compute-release loop over them, for one open cache and its slot memory. Host rows are filled by numpy, then copied to the
    device (pinned host memory when the slots are on a GPU)."""

    def __init__(self, cache: _native.SlotCache, views: SlotWeights, fmt: ExpertFormat,
                 layer_sizes: Sequence[int], device: torch.device) -> None:
        self.cache, self.views, self.fmt = cache, views, fmt
        self.layer_sizes = list(layer_sizes)
        self.device = device
        pin = device.type == "cuda"
        self._host = torch.full((len(layer_sizes), max(layer_sizes)), -1, dtype=torch.int32, pin_memory=pin)
        self._host_np = self._host.numpy()
        self._dev = self._host if not pin else torch.full_like(self._host, -1, device=device)

    def table(self, moe_layer: int, experts: list[int], slots: list[int], reuse: bool) -> torch.Tensor:
        """The device row of ``moe_layer`` mapping ``experts`` to ``slots``. ``reuse``: the row
        was written for an earlier chunk of this call."""
        if reuse and self.device.type == "cuda":
            # the previous chunk's copy of this row may still be pending on the stream
            torch.cuda.current_stream(self.device).synchronize()
        row = self._host_np[moe_layer]
        row.fill(-1)
        row[experts] = slots
        dev = self._dev[moe_layer, : self.layer_sizes[moe_layer]]
        if self._dev is not self._host:
            # ordered: every layer syncs the stream on its routing ids before it rewrites a row
            dev.copy_(self._host[moe_layer, : dev.shape[0]], non_blocking=True)
        return dev

    def run(
        self,
        moe_layer: int,
        distinct: list[int],
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        stream: int,
        observers: tuple[EngineObserver, ...],
        engine: object,
        after_first_acquire: Callable[[], None],
    ) -> torch.Tensor:
        """The layer's output for ``x`` computed chunk by chunk over the ``distinct`` routed
        experts; ``after_first_acquire`` runs once the first chunk's slots are held (the
        prefetcher's hook, so its loads queue behind this layer's)."""
        cache, out = self.cache, None
        step = cache.num_slots
        for start in range(0, len(distinct), step):
            chunk = distinct[start : start + step]
            slots = _acquire(cache, observers, engine, moe_layer, chunk, stream)
            try:
                table = self.table(moe_layer, chunk, slots, reuse=start > 0)
                if start == 0:
                    after_first_acquire()
                out = fused_experts(x, topk_ids, topk_weights, table, self.views, self.fmt, out)
            finally:
                cache.release(slots, stream)
        return torch.zeros_like(x) if out is None else out


def _acquire(cache: _native.SlotCache, observers: tuple[EngineObserver, ...], engine: object,
             moe_layer: int, experts: list[int], stream: int) -> list[int]:
    if not observers:
        return cache.acquire(moe_layer, experts, stream)

    def call() -> list[int]:
        return cache.acquire(moe_layer, experts, stream)

    for observer in observers:  # the first added wraps the acquire itself, the last is called first
        call = functools.partial(observer.acquire, engine, moe_layer, experts, call)
    return call()


__all__ = ["AcquirePath"]
