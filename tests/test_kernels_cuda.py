"""The CUDA expert kernels against the float64 oracle (GPU only): both regimes, every activation,
bf16 and fp16, ragged routing with idle experts and non-resident (-1) experts on permuted slots,
poisoned memory, accumulation into ``out``, CUDA-graph capture and replay, determinism, and the
fallback to the reference when CuPy is missing."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_kernels_align import check_alignment
from test_kernels_oracle import fused_experts_fp64, make_routing, make_slot_table, make_slots, rel_error

from sida_moe.format import ExpertFormat
from sida_moe.kernels import fused_experts
from sida_moe.kernels.configs import LaunchPlan

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy") if torch.cuda.is_available() else None

FORMATS = [
    ExpertFormat(hidden=256, intermediate=128, dtype=torch.bfloat16),
    ExpertFormat(hidden=128, intermediate=96, dtype=torch.float16, activation="gelu"),
    ExpertFormat(hidden=96, intermediate=64, dtype=torch.bfloat16, activation="gpt_oss", has_bias=True, alpha=1.702, limit=7.0),
    ExpertFormat(hidden=64, intermediate=192, dtype=torch.bfloat16, gated=False, activation="relu"),
    ExpertFormat(hidden=64, intermediate=64, dtype=torch.float16, activation="gelu_tanh"),
]
PLANS = [LaunchPlan("gemv", 4), LaunchPlan("gemv", 8), LaunchPlan("gemv", 16), LaunchPlan("mma", 8), LaunchPlan("mma", 16),
         LaunchPlan("mma", 32), LaunchPlan("grouped_mm", 1)]


def poison_allocator(device: torch.device) -> None:
    """Fill memory that the caching allocator will hand out next with NaN."""
    blocks = [torch.full((n,), float("nan"), device=device) for n in (1 << 24, 1 << 20, 1 << 18, 1 << 16, 1 << 12) for _ in range(4)]
    del blocks


def _case(fmt: ExpertFormat, num_tokens: int, seed: int, num_experts: int = 12, top_k: int = 3, num_slots: int = 15):
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device("cuda")
    _, views = make_slots(fmt, num_slots, dev, gen)
    ids, w = make_routing(num_tokens, num_experts, top_k, gen, dev, dead_experts=2)
    table = make_slot_table(num_experts, num_slots, gen, dev, missing=2)
    hidden = torch.randn(num_tokens, fmt.hidden, generator=gen).to(dev, fmt.dtype)
    return hidden, ids, w, table, views


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.activation}-{str(f.dtype)[6:]}")
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.regime}{p.block_m}")
@pytest.mark.parametrize("num_tokens", [1, 5, 40, 300])
def test_kernels_match_fp64_oracle(fmt: ExpertFormat, plan: LaunchPlan, num_tokens: int) -> None:
    from sida_moe.kernels.cuda_moe import fused_experts_cuda

    hidden, ids, w, table, views = _case(fmt, num_tokens, seed=num_tokens)
    ref = fused_experts_fp64(hidden, ids, w, table, views, fmt)
    poison_allocator(hidden.device)
    got = fused_experts_cuda(hidden, ids, w, table, views, fmt, plan=plan)
    assert got.dtype == fmt.dtype and got.shape == hidden.shape
    assert rel_error(got, ref) <= 1e-2
    base = torch.randn(hidden.shape, device=hidden.device).to(fmt.dtype)
    acc = fused_experts_cuda(hidden, ids.to(torch.int32), w.half(), table, views, fmt, out=base.clone(), plan=plan)
    assert rel_error(acc, ref + base.double()) <= 1e-2


def test_align_kernel_meets_definition() -> None:
    from sida_moe.kernels.cuda_moe import align_pairs_cuda, kernel_module

    mod = kernel_module(FORMATS[0], torch.cuda.current_device())
    stream = torch.cuda.current_stream().cuda_stream
    gen = torch.Generator().manual_seed(3)
    for num_tokens, num_experts, top_k, num_slots, bm in [(1, 128, 8, 128, 4), (300, 64, 8, 70, 16), (4096, 8, 2, 8, 1),
                                                          (50, 32, 4, 3000, 8), (1, 6144, 8, 6144, 16),
                                                          (64, 20000, 8, 20000, 16)]:  # past 48 KiB of shared memory
        ids, _ = make_routing(num_tokens, num_experts, top_k, gen, "cuda", dead_experts=num_experts // 8)
        table = make_slot_table(num_experts, num_slots, gen, "cuda", missing=num_experts // 8)
        a = align_pairs_cuda(mod, ids, table, num_slots, bm, stream)
        check_alignment(a, ids, table, num_slots, ordered_within_slot=False)


@pytest.mark.parametrize("regime", ["gemv", "mma", None])
def test_more_slots_than_the_align_kernel_and_grouped_mm_take(regime: str | None) -> None:
    """Past align_max_slots slots the pairs are sorted by the PyTorch version, on the GPU; past
    grouped_mm's 1024 groups the dispatcher keeps to the streaming kernels, even for many tokens."""
    from sida_moe.kernels.configs import plan_for
    from sida_moe.kernels.cuda_moe import align_max_slots, fused_experts_cuda

    fmt = ExpertFormat(hidden=64, intermediate=32, dtype=torch.bfloat16)
    num_tokens = 33 if regime else 600  # 600 tokens x 2 / 16 experts: grouped_mm territory
    num_slots = align_max_slots(torch.cuda.current_device()) + 100
    hidden, ids, w, table, views = _case(fmt, num_tokens, seed=21, num_experts=16, top_k=2, num_slots=num_slots)
    poison_allocator(hidden.device)
    if regime is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no grouped_mm failure, no fallback warning
            got = fused_experts(hidden, ids, w, table, views, fmt)
    else:
        got = fused_experts_cuda(hidden, ids, w, table, views, fmt, plan=plan_for(regime, num_tokens * 2 / 16))
    assert rel_error(got, fused_experts_fp64(hidden, ids, w, table, views, fmt)) <= 1e-2
    with pytest.raises(ValueError, match="at most 1024 slots"):
        fused_experts_cuda(hidden, ids, w, table, views, fmt, plan=plan_for("grouped_mm", 1.0))


def test_dispatcher_output_is_deterministic_and_fully_written() -> None:
    fmt = FORMATS[0]
    hidden, ids, w, table, views = _case(fmt, 64, seed=7, num_experts=8, top_k=2, num_slots=8)
    poison_allocator(hidden.device)
    first = fused_experts(hidden, ids, w, table, views, fmt)
    poison_allocator(hidden.device)
    second = fused_experts(hidden, ids, w, table, views, fmt)
    assert torch.equal(first, second)
    assert rel_error(first, fused_experts_fp64(hidden, ids, w, table, views, fmt)) <= 1e-2


@pytest.mark.parametrize("plan", [LaunchPlan("gemv", 8), LaunchPlan("mma", 16), LaunchPlan("grouped_mm", 1)], ids=lambda p: p.regime)
def test_cuda_graph_capture_and_replay(plan: LaunchPlan) -> None:
    from sida_moe.kernels.cuda_moe import fused_experts_cuda

    fmt = FORMATS[2]  # biases and the clamped SwiGLU
    hidden, ids, w, table, views = _case(fmt, 24, seed=11)
    out = torch.zeros_like(hidden)
    fused_experts_cuda(hidden, ids, w, table, views, fmt, out=out, plan=plan)  # compiles before capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            out.zero_()
            fused_experts_cuda(hidden, ids, w, table, views, fmt, out=out, plan=plan)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in (12, 13):  # new inputs written in place, then replay
        h2, ids2, w2, table2, _ = _case(fmt, 24, seed=seed)
        hidden.copy_(h2), ids.copy_(ids2), w.copy_(w2), table.copy_(table2)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(out, fused_experts_fp64(hidden, ids, w, table, views, fmt)) <= 1e-2


def test_falls_back_to_reference_with_one_warning_without_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    from sida_moe import kernels
    from sida_moe.kernels import cuda_build

    monkeypatch.setitem(cuda_build._cupy_state, "error", "ImportError: No module named 'cupy'")
    monkeypatch.setattr(kernels, "_warned", set())
    fmt = FORMATS[0]
    hidden, ids, w, table, views = _case(fmt, 9, seed=5)
    ref = fused_experts_fp64(hidden, ids, w, table, views, fmt)
    with pytest.warns(RuntimeWarning, match="CuPy"):
        got = fused_experts(hidden, ids, w, table, views, fmt)
    assert rel_error(got, ref) <= 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_experts(hidden, ids, w, table, views, fmt)  # warned once only
