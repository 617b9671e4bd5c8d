"""The visit sequence a benchmark records from the engine (``OffloadEngine.recording_acquires``)."""

from __future__ import annotations


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
