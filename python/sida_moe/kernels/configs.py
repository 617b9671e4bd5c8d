"""Launch plans per shape: which regime computes a layer and with how many rows per block.

Three regimes (cuda_moe.py), by mean pairs per expert ``T * k / E`` (known on the host without a
device sync; the real per-expert counts live on the device):
- ``gemv``: CUDA-core kernels streaming each touched expert's weights once per block of
  ``block_m`` sorted rows (one or two tokens per expert: purely memory-bound);
- ``mma``: the same streaming structure on tensor cores (mma.sync, weights as the 16-row side,
  8 tokens per n-tile): stays memory-bound up to tens of tokens per expert;
- ``grouped_mm``: ``torch._grouped_mm`` over the slot-sorted rows, with our gather, activation and
  reduction kernels around it (prefill: compute-bound).
The thresholds are measured crossovers between the regimes, one table per device
(``tuned/<device name>.json``, else ``tuned/default.json``; ``benches/kernels_h100.py`` measures
them on a device). ``SIDA_MOE_KERNEL_REGIME=gemv|mma|grouped_mm`` forces a regime (benchmarks),
read once at import; :func:`forced_regime` sets it for a block.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sida_moe.environment import KERNEL_REGIMES, environment

Regime = Literal["gemv", "mma", "grouped_mm"]
REGIMES: tuple[Regime, ...] = KERNEL_REGIMES

GEMV_BLOCK_SIZES = (4, 8, 16)
MMA_BLOCK_SIZES = (8, 16, 32)

_TUNED = Path(__file__).with_name("tuned")


@dataclass(frozen=True)
class Crossovers:
    """Mean pairs per expert up to which each streaming regime is the fastest on a device."""

    gemv_max_pairs_per_expert: float
    mma_max_pairs_per_expert: float

    def __post_init__(self) -> None:
        if not 0 < self.gemv_max_pairs_per_expert <= self.mma_max_pairs_per_expert:
            raise ValueError(f"need 0 < gemv_max_pairs_per_expert <= mma_max_pairs_per_expert, got {self}")


def _table_name(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


@functools.cache
def crossovers_for(device_name: str | None) -> Crossovers:
    """The crossovers measured on ``device_name`` (``torch.cuda.get_device_name``), else the
    default table's."""
    path = _TUNED / _table_name(device_name) if device_name else None
    if path is None or not path.is_file():
        path = _TUNED / "default.json"
    with open(path) as f:
        table = json.load(f)
    return Crossovers(float(table["gemv_max_pairs_per_expert"]), float(table["mma_max_pairs_per_expert"]))


DEFAULT_CROSSOVERS = crossovers_for(None)


@functools.cache
def device_crossovers(device_index: int | None) -> Crossovers:
    """The crossovers of CUDA device ``device_index`` (None: the current one); the default table
    where there is no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return DEFAULT_CROSSOVERS
    index = torch.cuda.current_device() if device_index is None else device_index
    return crossovers_for(torch.cuda.get_device_name(index))


_forced: Regime | None = environment().kernel_regime  # SIDA_MOE_KERNEL_REGIME


@contextmanager
def forced_regime(regime: Regime | None) -> Iterator[None]:
    """Plans inside the block use ``regime`` where it is available (None: the automatic choice)."""
    global _forced
    if regime is not None and regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES} or None, got {regime!r}")
    saved, _forced = _forced, regime
    try:
        yield
    finally:
        _forced = saved


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


def choose_plan(num_tokens: int, top_k: int, num_experts: int, grouped_mm_ok: bool, mma_ok: bool = True,
                crossovers: Crossovers = DEFAULT_CROSSOVERS) -> LaunchPlan:
    """Plan for a layer call on a device of ``crossovers``. A forced regime (module docstring)
    that is unavailable falls back to the automatic choice."""
    if num_tokens < 0 or top_k < 1 or num_experts < 1:
        raise ValueError(f"need num_tokens >= 0, top_k >= 1, num_experts >= 1; got {num_tokens}, {top_k}, {num_experts}")
    ppe = num_tokens * top_k / num_experts
    available = {"gemv": True, "mma": mma_ok, "grouped_mm": grouped_mm_ok}
    if _forced is not None and available[_forced]:
        return plan_for(_forced, ppe)
    if ppe <= crossovers.gemv_max_pairs_per_expert or not (mma_ok or grouped_mm_ok):
        return plan_for("gemv", ppe)
    if mma_ok and (ppe <= crossovers.mma_max_pairs_per_expert or not grouped_mm_ok):
        return plan_for("mma", ppe)
    if grouped_mm_ok:
        return plan_for("grouped_mm", ppe)
    return plan_for("gemv", ppe)


__all__ = [
    "DEFAULT_CROSSOVERS",
    "GEMV_BLOCK_SIZES",
    "MMA_BLOCK_SIZES",
    "REGIMES",
    "Crossovers",
    "LaunchPlan",
    "Regime",
    "choose_plan",
    "crossovers_for",
    "device_crossovers",
    "forced_regime",
    "gemv_block_m",
    "mma_block_m",
    "plan_for",
]
