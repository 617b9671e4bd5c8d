"""The routing of a forward's table visits, kept on the device until the forward ends.

One row per MoE layer call through the expert table: the layer's routed ids (``-1``: skipped
pairs; ``width = tokens * max top-k`` columns), then the table entry each pair read -- so the
cache tells hits (slot addresses) from misses (pool addresses) by what the step read, not by what
is resident when it hears. Rows live in one static buffer per width, so a captured decode step
writes the same addresses at every replay and its rows can be handed over after each one.
"""

from __future__ import annotations

import torch


class RoutingRing:
    """The rows of the forward being run (``visits``: their MoE layers, in call order)."""

    def __init__(self, num_layers: int, max_top_k: int, device: torch.device) -> None:
        self.num_layers, self.max_top_k, self.device = num_layers, max_top_k, device
        self._buffers: dict[int, torch.Tensor] = {}  # width -> [num_layers, 2 * width] int64
        self.visits: list[int] = []
        self.width = 0

    def fits(self, num_tokens: int) -> bool:
        """Whether a layer call of ``num_tokens`` tokens joins the pending rows (same width);
        if not, they must be handed over first (a forward of another shape: encoder vs decoder)."""
        return not self.visits or num_tokens * self.max_top_k == self.width

    def record(self, moe_layer: int, ids: torch.Tensor, table: torch.Tensor, clamp: bool) -> None:
        """Write ``ids [T, k]`` and the entries of ``table`` they read into the next row
        (``clamp``: ids may be -1 and are read as expert 0, their entry is not used)."""
        width = ids.shape[0] * self.max_top_k
        buffer = self._buffers.get(width)
        if buffer is None:
            with torch.inference_mode(False):  # written by later forwards, inference mode or not
                buffer = self._buffers[width] = torch.full((self.num_layers, 2 * width), -1, dtype=torch.int64,
                                                           device=self.device)
        self.width = width
        row = buffer[len(self.visits)]
        flat = ids.reshape(-1)
        row[: flat.numel()].copy_(flat)
        torch.index_select(table, 0, flat.clamp(min=0) if clamp else flat, out=row[width : width + flat.numel()])
        self.visits.append(moe_layer)

    def pending_rows(self) -> torch.Tensor:
        """The rows of the pending visits (a view of the static buffer)."""
        return self._buffers[self.width][: len(self.visits)]

    def take(self) -> tuple[list[int], int]:
        """The pending visits and their width, forgotten here (their rows stay in the buffer)."""
        visits, self.visits = self.visits, []
        return visits, self.width

    def restore(self, visits: list[int], width: int) -> None:
        """Make ``visits`` of ``width`` pending again (a replay of the captured step that wrote them)."""
        self.visits, self.width = list(visits), width


__all__ = ["RoutingRing"]
