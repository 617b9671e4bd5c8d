"""The copy and compute timeline of a few decode steps, for the benchmark's timeline plot."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def decode_timeline(model: nn.Module, prompts, device: torch.device, steps: int = 4) -> list[dict[str, Any]]:
    """Copies and compute kernels of a few decode steps, from a profiler trace (CUPTI sees the copies
    the native runtime issues through the driver API as well as PyTorch's kernels)."""
    if device.type != "cuda":
        return []
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.inference_mode():
        model.generate(**prompts, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    events = []
    for e in trace.get("traceEvents", []):
        cat = e.get("cat", "")
        if cat in ("kernel", "gpu_memcpy") and "ts" in e and "dur" in e:
            lane = "copy H2D" if cat == "gpu_memcpy" and "HtoD" in e.get("name", "") else ("compute" if cat == "kernel" else None)
            if lane:
                events.append({"lane": lane, "start_ms": e["ts"] / 1e3, "dur_ms": e["dur"] / 1e3})
    if events:
        t0 = min(e["start_ms"] for e in events)
        for e in events:
            e["start_ms"] -= t0
    return events


__all__ = ["decode_timeline"]
