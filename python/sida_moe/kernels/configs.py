"""Launch plans per shape: which regime computes a layer and with how many rows per block.

Two regimes (cuda_moe.py):
- ``gemv``: CUDA-core kernels that stream each touched expert's weights once per block of
  ``block_m`` sorted rows (decode: memory-bound, the cost is the bytes of the touched experts);
- ``grouped_mm``: ``torch._grouped_mm`` (tensor cores) over the slot-sorted rows, with our gather,
  activation and reduction kernels around it (prefill: compute-bound).

The choice uses the mean number of pairs per expert, ``T * k / E`` (known on the host without a
device sync; the real per-expert counts live on the device). The thresholds are the crossovers
measured on the H100 by ``benches/kernels_h100.py`` (see NOTES.md, "Kernels").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

Regime = Literal["gemv", "grouped_mm"]

GEMV_BLOCK_SIZES = (4, 8, 16)

# Mean pairs per expert at or below which the GEMV kernels beat grouped_mm (H100, measured).
GEMV_MAX_PAIRS_PER_EXPERT = 8.0


@dataclass(frozen=True)
class LaunchPlan:
    regime: Regime
    block_m: int  # rows per block of the sorted pairs (1 for grouped_mm: no padding)


def gemv_block_m(pairs_per_expert: float) -> int:
    """Rows per GEMV block: enough to hold an expert's typical pair count in one block (each block
    re-reads the expert's weights), no more (registers and padding)."""
    for bm in GEMV_BLOCK_SIZES:
        if pairs_per_expert <= bm:
            return bm
    return GEMV_BLOCK_SIZES[-1]


def choose_plan(num_tokens: int, top_k: int, num_experts: int, grouped_mm_ok: bool) -> LaunchPlan:
    """Plan for a layer call. ``SIDA_MOE_KERNEL_REGIME=gemv|grouped_mm`` forces a regime (benchmarks)."""
    if num_tokens < 0 or top_k < 1 or num_experts < 1:
        raise ValueError(f"need num_tokens >= 0, top_k >= 1, num_experts >= 1; got {num_tokens}, {top_k}, {num_experts}")
    pairs_per_expert = num_tokens * top_k / num_experts
    forced = os.environ.get("SIDA_MOE_KERNEL_REGIME", "")
    if forced not in ("", "gemv", "grouped_mm"):
        raise ValueError(f"SIDA_MOE_KERNEL_REGIME must be 'gemv' or 'grouped_mm', got {forced!r}")
    if forced == "grouped_mm" and grouped_mm_ok:
        return LaunchPlan("grouped_mm", 1)
    if forced == "gemv" or not grouped_mm_ok or pairs_per_expert <= GEMV_MAX_PAIRS_PER_EXPERT:
        return LaunchPlan("gemv", gemv_block_m(pairs_per_expert))
    return LaunchPlan("grouped_mm", 1)


__all__ = ["GEMV_BLOCK_SIZES", "GEMV_MAX_PAIRS_PER_EXPERT", "LaunchPlan", "Regime", "choose_plan", "gemv_block_m"]
