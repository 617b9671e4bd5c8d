"""What a benchmark or a tool may observe of an engine's layer calls, through one explicit hook
(``OffloadEngine.observe``) instead of switches inside the engine: an engine with no observer
runs nothing of this.

An observer is called on the inference thread, in the order the layers run:

- ``opened(engine)``: when it is added while the cache is open, and after each (re)open of the
  cache (e.g. to turn on the cache's own stream-wait timing);
- ``table_visit(engine, moe_layer, ids)``: a decode layer computed through the expert table with
  the routed ``ids`` (a device tensor, ``-1`` for skipped pairs; reading it back is a sync);
- ``acquire(engine, moe_layer, experts, call)``: a prefill layer acquires slots for ``experts``;
  ``call()`` does it and returns the slots, which the observer returns (it may time or wait
  around it);
- ``stats(engine)``: figures merged into ``engine.stats()``; ``reset(engine)``: at
  ``engine.reset_stats()``; ``removed(engine)``: when the observing ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sida_moe.engine import OffloadEngine


class EngineObserver:
    """Base class: every hook does nothing (override the ones you need)."""

    def opened(self, engine: OffloadEngine) -> None:
        return None

    def table_visit(self, engine: OffloadEngine, moe_layer: int, ids: torch.Tensor) -> None:
        return None

    def acquire(self, engine: OffloadEngine, moe_layer: int, experts: list[int], call: Callable[[], list[int]]) -> list[int]:
        return call()

    def stats(self, engine: OffloadEngine) -> dict[str, float]:
        return {}

    def reset(self, engine: OffloadEngine) -> None:
        return None

    def removed(self, engine: OffloadEngine) -> None:
        return None


__all__ = ["EngineObserver"]
