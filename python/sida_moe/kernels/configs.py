"""Launch plans per shape: which regime computes a layer and with how many rows per block.

Three regimes (cuda_moe.py), by mean pairs per expert ``T * k / E`` (known on the host without a
device sync; the real per-expert counts live on the device):
- ``gemv``: CUDA-core kernels streaming each touched expert's weights once per block of
  ``block_m`` sorted rows (one or two tokens per expert: purely memory-bound);
- ``mma``: the same streaming structure on tensor cores (mma.sync, weights as the 16-row side,
  8 tokens per n-tile): stays memory-bound up to tens of tokens per expert;
- ``grouped_mm``: ``torch._grouped_mm`` over the slot-sorted rows, with our gather, activation and
  reduction kernels around it (prefill: compute-bound).
The thresholds are measured crossovers between the regimes (``benches/kernels_h100.py`` measures
them on a device).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

Regime = Literal["gemv", "mma", "grouped_mm"]
REGIMES: tuple[Regime, ...] = ("gemv", "mma", "grouped_mm")

GEMV_BLOCK_SIZES = (4, 8, 16)
MMA_BLOCK_SIZES = (8, 16, 32)

# Mean pairs per expert up to which each regime is the fastest (measured crossovers, NOTES.md "Kernels"):
# gemv wins at T=1 (0.06-0.25 pairs per expert), mma from about 0.5 (Switch T=64) to 4-8 (Qwen3
# T=64, gpt-oss T=64 by 2%), grouped_mm from 8 on (Switch T=1024: 0.16 ms against mma's 0.21).
GEMV_MAX_PAIRS_PER_EXPERT = 0.25
MMA_MAX_PAIRS_PER_EXPERT = 6.0


@dataclass(frozen=True)
class LaunchPlan:
    regime: Regime
    block_m: int  # rows per block of the sorted pairs (1 for grouped_mm: no padding)

    def __post_init__(self) -> None:
        allowed = {"gemv": GEMV_BLOCK_SIZES, "mma": MMA_BLOCK_SIZES, "grouped_mm": (1,)}
        if self.regime not in allowed:
            raise ValueError(f"regime must be one of {REGIMES}, got {self.regime!r}")
        if self.block_m not in allowed[self.regime]:
            raise ValueError(f"block_m for {self.regime} must be one of {allowed[self.regime]}, got {self.block_m}")


def _smallest_at_least(sizes: tuple[int, ...], pairs_per_expert: float) -> int:
    for bm in sizes:
        if pairs_per_expert <= bm:
            return bm
    return sizes[-1]


def gemv_block_m(pairs_per_expert: float) -> int:
    """Rows per GEMV block: enough to hold an expert's typical pair count in one block (each block
    re-reads the expert's weights), no more (registers and padding)."""
    return _smallest_at_least(GEMV_BLOCK_SIZES, pairs_per_expert)


def mma_block_m(pairs_per_expert: float) -> int:
    """Rows per tensor-core GEMV block (8 tokens per n-tile). 16 measured at least as fast as 8
    even at one pair per expert (the popular experts of a ragged routing get several), and faster
    than 32 up to 16 pairs per expert."""
    return 16 if pairs_per_expert <= 16 else 32


def plan_for(regime: Regime, pairs_per_expert: float) -> LaunchPlan:
    """The plan of a given regime for a mean pair count per expert."""
    if regime == "gemv":
        return LaunchPlan("gemv", gemv_block_m(pairs_per_expert))
    if regime == "mma":
        return LaunchPlan("mma", mma_block_m(pairs_per_expert))
    if regime == "grouped_mm":
        return LaunchPlan("grouped_mm", 1)
    raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")


def choose_plan(num_tokens: int, top_k: int, num_experts: int, grouped_mm_ok: bool, mma_ok: bool = True) -> LaunchPlan:
    """Plan for a layer call. ``SIDA_MOE_KERNEL_REGIME=gemv|mma|grouped_mm`` forces a regime
    (benchmarks); a forced regime that is unavailable falls back to the automatic choice."""
    if num_tokens < 0 or top_k < 1 or num_experts < 1:
        raise ValueError(f"need num_tokens >= 0, top_k >= 1, num_experts >= 1; got {num_tokens}, {top_k}, {num_experts}")
    ppe = num_tokens * top_k / num_experts
    forced = os.environ.get("SIDA_MOE_KERNEL_REGIME", "")
    if forced and forced not in REGIMES:
        raise ValueError(f"SIDA_MOE_KERNEL_REGIME must be one of {REGIMES}, got {forced!r}")
    available = {"gemv": True, "mma": mma_ok, "grouped_mm": grouped_mm_ok}
    if forced and available[forced]:
        return plan_for(forced, ppe)
    if ppe <= GEMV_MAX_PAIRS_PER_EXPERT or not (mma_ok or grouped_mm_ok):
        return plan_for("gemv", ppe)
    if mma_ok and (ppe <= MMA_MAX_PAIRS_PER_EXPERT or not grouped_mm_ok):
        return plan_for("mma", ppe)
    if grouped_mm_ok:
        return plan_for("grouped_mm", ppe)
    return plan_for("gemv", ppe)


__all__ = [
    "GEMV_BLOCK_SIZES",
    "GEMV_MAX_PAIRS_PER_EXPERT",
    "MMA_BLOCK_SIZES",
    "MMA_MAX_PAIRS_PER_EXPERT",
    "REGIMES",
    "LaunchPlan",
    "Regime",
    "choose_plan",
    "gemv_block_m",
    "mma_block_m",
    "plan_for",
]
