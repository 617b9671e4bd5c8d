"""The visit sequence of an engine's cache (``VisitRecorder``, an engine observer): in exact mode
the same input gives the same sequence, which fed to ``set_future`` makes the predictive policy
Belady's optimum."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sida_moe.engine_observer import EngineObserver


class VisitTrace(list):
    """``(moe_layer, experts)`` per cache visit, in order (what ``set_future`` takes);
    ``through_table[i]``: visit ``i`` was a layer read through the expert table (decode), else an
    acquire (prefill)."""

    def __init__(self) -> None:
        super().__init__()
        self.through_table: list[bool] = []

    def add(self, moe_layer: int, experts: list[int], through_table: bool) -> None:
        self.append((moe_layer, experts))
        self.through_table.append(through_table)


class VisitRecorder(EngineObserver):
    """Records every cache visit while observing (``with engine.observe(VisitRecorder()) as r``):
    acquire calls, and decode layers read through the expert table (each a sync here), into
    ``trace``."""

    def __init__(self) -> None:
        self.trace = VisitTrace()

    def table_visit(self, engine, moe_layer: int, ids: torch.Tensor) -> None:
        self.trace.add(moe_layer, torch.unique(ids[ids >= 0]).tolist(), through_table=True)

    def acquire(self, engine, moe_layer: int, experts: list[int], call: Callable[[], list[int]]) -> list[int]:
        self.trace.add(moe_layer, experts, through_table=False)
        return call()


__all__ = ["VisitRecorder", "VisitTrace"]
