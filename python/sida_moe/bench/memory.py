"""GPU memory around the benchmark's rows: the peak a row reached, and rows skipped when they
run out of memory."""

from __future__ import annotations

import gc
import sys
from typing import Any

import torch
from torch import nn


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def skip_out_of_memory(meta: dict[str, Any], model: nn.Module, device: torch.device, what: str,
                       error: BaseException) -> None:
    """One line on stderr and a note in the report for rows that ran out of memory; the steps
    captured for them and the allocator's cache are released so that the next rows can run."""
    from sida_moe.decode_graph import forget_captured_steps

    forget_captured_steps(model)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    print(f"sida-moe bench: note: skipping {what}: out of memory ({reason})", file=sys.stderr, flush=True)
    meta.setdefault("skipped_out_of_memory", []).append({"rows": what, "error": reason})


__all__ = ["peak_gib", "reset_peak", "skip_out_of_memory"]
