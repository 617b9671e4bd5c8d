"""The benchmark's engine observers (``sida_moe.engine_observer``): stall timing on CUDA and the
SiDA paper's synchronous loading."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sida_moe import _native
from sida_moe.engine_observer import EngineObserver


class StallTimer(EngineObserver):
    """On the CUDA backend, adds to ``engine.stats()``:

    - ``stream_wait_seconds`` (the stall): GPU time the compute stream waited on slot-ready events
      of copies still in flight, timed by the slot cache itself (a ``StreamWaitProbe`` open
      while observing); acquires whose copies had all landed add nothing;
    - ``acquire_stream_seconds``: GPU time between CUDA events recorded on the compute stream just
      before and just after each ``acquire`` call. When the stream is idle (host-bound decode)
      this also counts the host's own bookkeeping inside ``acquire``.

    On the host backend it times nothing and adds nothing."""

    def __init__(self) -> None:
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0
        self.probe = None  # the open cache's StreamWaitProbe (CUDA)

    @staticmethod
    def _cuda(engine) -> bool:
        return engine.cache is not None and engine.cache.backend_kind == "cuda"

    def opened(self, engine) -> None:
        if self.probe is not None:
            self.probe.close()  # of a cache that was replaced
        self.probe = _native.StreamWaitProbe(engine.cache) if self._cuda(engine) else None

    def acquire(self, engine, moe_layer: int, experts: list[int], call: Callable[[], list[int]]) -> list[int]:
        if not self._cuda(engine):
            return call()
        # the stream passes `before`, then the slots' ready-event waits, then `after`; while the
        # stream is idle `after` is only enqueued once the host returns from acquire, so its
        # bookkeeping counts too (the GPU-side wait alone is the cache's stream_wait_seconds)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record()
        slots = call()
        after.record()
        self._events.append((before, after))
        return slots

    def stats(self, engine) -> dict[str, float]:
        if not self._cuda(engine):
            return {}
        for before, after in self._events:
            after.synchronize()
            self._seconds += before.elapsed_time(after) / 1e3
        self._events.clear()
        return {"stream_wait_seconds": self.probe.seconds(), "acquire_stream_seconds": self._seconds}

    def reset(self, engine) -> None:
        self._events.clear()
        self._seconds = 0.0

    def removed(self, engine) -> None:
        if self.probe is not None:
            self.probe.close()
            self.probe = None


class SyncLoads(EngineObserver):
    """The SiDA paper's loading: the host waits for each layer's copies before it computes."""

    def acquire(self, engine, moe_layer: int, experts: list[int], call: Callable[[], list[int]]) -> list[int]:
        slots = call()
        if engine.device.type == "cuda":
            torch.cuda.current_stream(engine.device).synchronize()
        return slots


__all__ = ["StallTimer", "SyncLoads"]
