"""Microbenchmarks of one MoE layer through ``sida_moe.kernels.fused_experts`` (pytest-benchmark).

    python3 -m pytest benches/bench_kernels.py --benchmark-only

CPU: the reference path on a small shape. GPU (skipped without CUDA and CuPy): Qwen3-30B-A3B expert
shapes (H 2048, I 768, 128 experts, top-8) at decode and prefill sizes, in each regime. Wall time per
call including the host work (a synchronize closes every call); the per-regime, per-shape device times
with floors and baselines come from ``benches/kernels_h100.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_kernels_oracle import make_routing, make_slot_table, make_slots  # noqa: E402

from sida_moe.format import ExpertFormat  # noqa: E402
from sida_moe.kernels import fused_experts  # noqa: E402

_HAS_GPU = torch.cuda.is_available()
try:
    import cupy  # noqa: F401

    _HAS_CUPY = True
except ImportError:
    _HAS_CUPY = False


def _layer(fmt: ExpertFormat, num_tokens: int, num_experts: int, top_k: int, device: str):
    gen = torch.Generator().manual_seed(num_tokens)
    _, views = make_slots(fmt, num_experts, device, gen)
    ids, w = make_routing(num_tokens, num_experts, top_k, gen, device)
    table = make_slot_table(num_experts, num_experts, gen, device)
    hidden = torch.randn(num_tokens, fmt.hidden, generator=gen).to(device, fmt.dtype)
    return hidden, ids, w, table, views


@pytest.mark.parametrize("num_tokens", [1, 64])
def test_bench_reference_cpu(benchmark, num_tokens: int) -> None:
    fmt = ExpertFormat(hidden=256, intermediate=128, dtype=torch.float32)
    hidden, ids, w, table, views = _layer(fmt, num_tokens, 16, 2, "cpu")
    out = benchmark(fused_experts, hidden, ids, w, table, views, fmt)
    assert out.shape == hidden.shape and bool(torch.isfinite(out).all())


@pytest.mark.skipif(not (_HAS_GPU and _HAS_CUPY), reason="needs a CUDA device and CuPy")
@pytest.mark.parametrize("regime,num_tokens", [("gemv", 1), ("mma", 1), ("mma", 64), ("grouped_mm", 64), ("grouped_mm", 1024), ("auto", 1),
                                               ("auto", 64), ("auto", 1024)])
def test_bench_qwen3_layer_gpu(benchmark, regime: str, num_tokens: int) -> None:
    from sida_moe.kernels.configs import forced_regime

    fmt = ExpertFormat(hidden=2048, intermediate=768, dtype=torch.bfloat16)
    hidden, ids, w, table, views = _layer(fmt, num_tokens, 128, 8, "cuda")

    def call() -> torch.Tensor:
        out = fused_experts(hidden, ids, w, table, views, fmt)
        torch.cuda.synchronize()
        return out

    with forced_regime(None if regime == "auto" else regime):
        call()  # compile and warm up outside the timing
        out = benchmark(call)
    assert out.shape == hidden.shape and bool(torch.isfinite(out).all())
