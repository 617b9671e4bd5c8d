"""Check and time the expert kernels on a GPU, in one run (made for the H100 of the device machine).

    PYTHONPATH=python python3 benches/kernels_h100.py --out benches/results/h100_kernels.json

1. Ceilings: HBM read bandwidth (a large reduction), device-to-device copy, bf16 GEMM 8192^3.
2. Correctness: every shape (Qwen3-30B-A3B, OLMoE, Mixtral-8x7B, gpt-oss-20b, Switch-base-128) at
   T in {1, 2, 7, 16, 64, 256, 1024, 4096}, both regimes and the dispatcher's own choice, against a
   float64 oracle, with ragged routing, idle experts, experts on permuted slots and -1 slots,
   memory poisoned with NaN before each call; accumulation into ``out``; fp16; a CUDA graph replay.
3. Timings (median of CUDA-graph replays, and eager): our regimes, the transformers-style
   grouped_mm experts path on contiguous [E, ...] weights, the two torch grouped_mm GEMMs alone,
   the per-expert loop, and the two floors (touched expert bytes / read bandwidth, FLOPs / bf16 rate).
Prints a table last; writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "tests"))
try:
    import sida_moe  # noqa: F401
except ImportError:  # native runtime not built here: the kernels need none of it
    _pkg = types.ModuleType("sida_moe")
    _pkg.__path__ = [str(ROOT / "python" / "sida_moe")]
    sys.modules["sida_moe"] = _pkg

from test_kernels_oracle import fused_experts_fp64, make_routing, make_slot_table, make_slots, rel_error  # noqa: E402

from sida_moe.format import ExpertFormat  # noqa: E402
from sida_moe.kernels import configs, fused_experts  # noqa: E402
from sida_moe.kernels import grouped_mm as gmm  # noqa: E402
from sida_moe.kernels.configs import LaunchPlan  # noqa: E402
from sida_moe.kernels.cuda_moe import fused_experts_cuda  # noqa: E402

BF16 = torch.bfloat16
SHAPES: dict[str, tuple[ExpertFormat, int, int]] = {
    "qwen3-30b-a3b": (ExpertFormat(2048, 768, BF16), 128, 8),
    "olmoe-1b-7b": (ExpertFormat(2048, 1024, BF16), 64, 8),
    "mixtral-8x7b": (ExpertFormat(4096, 14336, BF16), 8, 2),
    "gpt-oss-20b": (ExpertFormat(2880, 2880, BF16, activation="gpt_oss", has_bias=True), 32, 4),
    "switch-base-128": (ExpertFormat(768, 3072, BF16, gated=False, activation="relu"), 128, 1),
}
TOKENS = [1, 2, 7, 16, 64, 256, 1024, 4096]
TOL = 1e-2
DEV = torch.device("cuda")


def log(*args: object) -> None:
    print(*args, flush=True)


# ------------------------------------------------------------------------------------- timing
def time_events(fn, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` timed with CUDA events, one sample per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b))
    return statistics.median(samples)


def time_graph(calls, reps: int = 15) -> float | None:
    """Per-call median ms of a CUDA graph that runs every callable in ``calls`` once (distinct
    inputs per call, like successive layers: the weights are not all L2-resident)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:  # warm-up outside the capture (compiles kernels, creates handles)
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream):
            for c in calls:
                c()
    except Exception as exc:  # a path that syncs the host cannot be captured
        log(f"    (graph capture failed: {type(exc).__name__}: {str(exc)[:120]})")
        torch.cuda.synchronize()
        return None
    ms = time_events(graph.replay, reps)
    del graph
    return ms / len(calls)


def time_eager(calls, reps: int = 7) -> float:
    def run_all():
        for c in calls:
            c()

    return time_events(run_all, reps) / len(calls)


# ------------------------------------------------------------------------------------ ceilings
def measure_ceilings() -> dict[str, float]:
    x = torch.randn(1 << 30, device=DEV, dtype=BF16)  # 2 GiB
    ms = time_events(lambda: x.sum(dtype=torch.float32), 10)
    read_gbps = x.numel() * 2 / ms / 1e6
    y = torch.empty_like(x)
    ms_copy = time_events(lambda: y.copy_(x), 10)
    copy_gbps = 2 * x.numel() * 2 / ms_copy / 1e6
    del x, y
    a = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    b = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    ms_mm = time_events(lambda: a @ b, 10)
    tflops = 2 * 8192**3 / ms_mm / 1e9
    del a, b
    torch.cuda.empty_cache()
    return {"hbm_read_GBps": read_gbps, "d2d_copy_rw_GBps": copy_gbps, "bf16_gemm_TFLOPs": tflops}


# ------------------------------------------------------------------------------------ baselines
def contiguous_experts(views, table: torch.Tensor, num_experts: int) -> dict[str, torch.Tensor | None]:
    """Expert-indexed contiguous weights ([E, ...], as transformers stores them) from the slots."""
    idx = table.long().clamp_min(0)
    return {
        name: (getattr(views, name)[idx].contiguous() if getattr(views, name) is not None else None)
        for name in ("gate_up", "down", "gate_up_bias", "down_bias")
    }


def _act_torch(z: torch.Tensor, fmt: ExpertFormat) -> torch.Tensor:
    F = torch.nn.functional
    if fmt.gated:
        g, u = z[:, : fmt.intermediate], z[:, fmt.intermediate :]
        if fmt.activation == "gpt_oss":
            g = g.clamp(max=fmt.limit)
            u = u.clamp(-fmt.limit, fmt.limit)
            return (u + 1) * (g * torch.sigmoid(g * fmt.alpha))
        return F.silu(g) * u if fmt.activation == "silu" else F.gelu(g) * u
    return F.relu(z) if fmt.activation == "relu" else F.gelu(z)


def tf_grouped_mm_layer(hidden, ids, w, experts, fmt: ExpertFormat, num_experts: int) -> torch.Tensor:
    """transformers 5's ``grouped_mm_experts_forward``, operation by operation."""
    fn = gmm.grouped_mm_function()
    k = ids.shape[1]
    sw = w.reshape(-1)
    eids = ids.reshape(-1)
    eids_g, perm = torch.sort(eids)
    xs = hidden[perm // k]
    sw_g = sw[perm]
    tpe = torch.histc(eids_g.int() if eids_g.is_cuda else eids_g.float(), bins=num_experts, min=0, max=num_experts - 1)
    offs = torch.cumsum(tpe, dim=0, dtype=torch.int32)
    h = fn(xs, experts["gate_up"].transpose(-2, -1), offs=offs)
    if experts["gate_up_bias"] is not None:
        h.add_(experts["gate_up_bias"][eids_g])
    a = _act_torch(h, fmt)
    y = fn(a, experts["down"].transpose(-2, -1), offs=offs)
    if experts["down_bias"] is not None:
        y.add_(experts["down_bias"][eids_g])
    y = y * sw_g.unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.size(0), device=perm.device)
    return y[inv].view(hidden.shape[0], k, fmt.hidden).sum(dim=1).to(hidden.dtype)


def per_expert_loop(hidden, ids, w, experts, fmt: ExpertFormat, num_experts: int) -> torch.Tensor:
    """transformers' eager experts loop (one host sync for the experts hit, one GEMM pair each)."""
    out = torch.zeros_like(hidden)
    mask = torch.nn.functional.one_hot(ids, num_classes=num_experts).permute(2, 1, 0)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = int(e[0])
        j, tok = torch.where(mask[e])
        x = hidden[tok]
        z = torch.nn.functional.linear(x, experts["gate_up"][e], None if experts["gate_up_bias"] is None else experts["gate_up_bias"][e])
        y = torch.nn.functional.linear(_act_torch(z, fmt), experts["down"][e], None if experts["down_bias"] is None else experts["down_bias"][e])
        out.index_add_(0, tok, (y * w[tok, j, None]).to(out.dtype))
    return out


# --------------------------------------------------------------------------------- correctness
def poison() -> None:
    blocks = [torch.full((n,), float("nan"), device=DEV) for n in (1 << 28, 1 << 26, 1 << 22, 1 << 20, 1 << 16) for _ in range(2)]
    del blocks


def check_shape(name: str, fmt: ExpertFormat, num_experts: int, top_k: int, views, gen, results: list[dict]) -> None:
    num_slots = views.num_slots
    for t in TOKENS:
        ids, w = make_routing(t, num_experts, top_k, gen, DEV, dead_experts=max(1, num_experts // 8))
        table = make_slot_table(num_experts, num_slots, gen, DEV, missing=max(1, num_experts // 8))
        hidden = (torch.randn(t, fmt.hidden, generator=gen) * 1.0).to(DEV, fmt.dtype)
        ref = fused_experts_fp64(hidden, ids, w, table, views, fmt)
        row = {"shape": name, "T": t}
        ppe = t * top_k / num_experts
        for label, plan in (("gemv", configs.plan_for("gemv", ppe)), ("mma", configs.plan_for("mma", ppe)),
                            ("grouped_mm", LaunchPlan("grouped_mm", 1)), ("auto", None)):
            poison()
            if plan is None:
                got = fused_experts(hidden, ids, w, table, views, fmt)
            else:
                got = fused_experts_cuda(hidden, ids, w, table, views, fmt, plan=plan)
            row[label] = rel_error(got, ref)
        base = torch.randn(t, fmt.hidden, generator=gen).to(DEV, fmt.dtype)
        poison()
        acc = fused_experts(hidden, ids.int(), w.to(fmt.dtype), table, views, fmt, out=base.clone())
        row["accumulate"] = rel_error(acc, ref + base.double())
        row["ok"] = all(row[k] <= TOL for k in ("gemv", "mma", "grouped_mm", "auto", "accumulate"))
        results.append(row)
        log(f"  check {name:16s} T={t:5d} gemv={row['gemv']:.2e} mma={row['mma']:.2e} grouped={row['grouped_mm']:.2e} "
            f"auto={row['auto']:.2e} acc={row['accumulate']:.2e} {'ok' if row['ok'] else 'FAIL'}")
        del ref, got, acc


def check_graph(fmt: ExpertFormat, num_experts: int, top_k: int, views, gen) -> dict:
    out: dict[str, float] = {}
    for t, plan in ((16, LaunchPlan("gemv", 4)), (64, LaunchPlan("mma", 16)), (1024, LaunchPlan("grouped_mm", 1))):
        ids, w = make_routing(t, num_experts, top_k, gen, DEV, dead_experts=4)
        table = make_slot_table(num_experts, views.num_slots, gen, DEV, missing=4)
        hidden = torch.randn(t, fmt.hidden, generator=gen).to(DEV, fmt.dtype)
        res = torch.zeros_like(hidden)
        fused_experts_cuda(hidden, ids, w, table, views, fmt, out=res, plan=plan)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            res.zero_()
            fused_experts_cuda(hidden, ids, w, table, views, fmt, out=res, plan=plan)
        torch.cuda.current_stream().wait_stream(stream)
        ids2, w2 = make_routing(t, num_experts, top_k, gen, DEV, dead_experts=4)
        ids.copy_(ids2), w.copy_(w2), hidden.copy_(torch.randn(t, fmt.hidden, generator=gen).to(DEV, fmt.dtype))
        table.copy_(make_slot_table(num_experts, views.num_slots, gen, DEV, missing=4))
        poison()
        graph.replay()
        torch.cuda.synchronize()
        out[f"{plan.regime}_T{t}"] = rel_error(res, fused_experts_fp64(hidden, ids, w, table, views, fmt))
        del graph
    return out


# ------------------------------------------------------------------------------------- timings
def bench_shape(name: str, fmt: ExpertFormat, num_experts: int, top_k: int, views, gen, ceil: dict, rows: list[dict],
                token_list: list[int]) -> None:
    expert_bytes = sum(n for _, n in fmt.layout())
    flops_per_pair = 2 * (fmt.gate_up_rows * fmt.hidden + fmt.hidden * fmt.intermediate)
    nrep = 4  # calls per graph, distinct routing each (like successive layers)
    table = make_slot_table(num_experts, views.num_slots, gen, DEV)  # all resident, permuted
    experts = contiguous_experts(views, table, num_experts)
    for t in token_list:
        inputs = []
        touched = 0
        for _ in range(nrep):
            ids, w = make_routing(t, num_experts, top_k, gen, DEV)
            hidden = torch.randn(t, fmt.hidden, generator=gen).to(DEV, fmt.dtype)
            inputs.append((hidden, ids, w))
            touched += int(torch.unique(ids).numel())
        touched /= nrep
        floor_hbm = touched * expert_bytes / (ceil["hbm_read_GBps"] * 1e6)
        floor_mma = t * top_k * flops_per_pair / (ceil["bf16_gemm_TFLOPs"] * 1e9)
        row = {"shape": name, "T": t, "experts_touched": touched, "floor_hbm_ms": floor_hbm, "floor_bf16_ms": floor_mma,
               "floor_ms": max(floor_hbm, floor_mma)}
        ppe = t * top_k / num_experts

        def ours(plan):
            return [lambda h=h, i=i, w=w: fused_experts_cuda(h, i, w, table, views, fmt, plan=plan) for h, i, w in inputs]

        if ppe <= 8:
            row["gemv_ms"] = time_graph(ours(configs.plan_for("gemv", ppe)))
        if ppe <= 128:
            for bm in configs.MMA_BLOCK_SIZES:
                row[f"mma{bm}_ms"] = time_graph(ours(LaunchPlan("mma", bm)))
            row["mma_ms"] = min(row[f"mma{bm}_ms"] for bm in configs.MMA_BLOCK_SIZES)
        row["grouped_mm_ms"] = time_graph(ours(LaunchPlan("grouped_mm", 1)))
        auto = [lambda h=h, i=i, w=w: fused_experts(h, i, w, table, views, fmt) for h, i, w in inputs]
        row["auto_regime"] = configs.choose_plan(t, top_k, num_experts, gmm.grouped_mm_usable(DEV)).regime
        row["pairs_per_expert"] = ppe
        row["auto_ms"] = time_graph(auto)
        row["auto_eager_ms"] = time_eager(auto)
        tf = [lambda h=h, i=i, w=w: tf_grouped_mm_layer(h, i, w, experts, fmt, num_experts) for h, i, w in inputs]
        row["tf_grouped_mm_ms"] = time_graph(tf)
        row["tf_grouped_mm_eager_ms"] = time_eager(tf)
        # the two grouped GEMMs alone, on pre-sorted rows
        fn = gmm.grouped_mm_function()
        h0, i0, _ = inputs[0]
        eids_g, perm = torch.sort(i0.reshape(-1))
        xs = h0[perm // top_k].contiguous()
        offs = torch.cumsum(torch.histc(eids_g.int(), bins=num_experts, min=0, max=num_experts - 1), 0, dtype=torch.int32)
        a = torch.randn(xs.shape[0], fmt.intermediate, device=DEV).to(fmt.dtype)
        gu, dn = experts["gate_up"].transpose(-2, -1), experts["down"].transpose(-2, -1)
        row["grouped_mm_gemms_only_ms"] = time_graph([lambda: (fn(xs, gu, offs=offs), fn(a, dn, offs=offs))])
        if t <= 1024:
            loop = [lambda h=h, i=i, w=w: per_expert_loop(h, i, w, experts, fmt, num_experts) for h, i, w in inputs[:2]]
            row["per_expert_loop_ms"] = time_eager(loop, reps=3)
        best = min(v for k, v in row.items() if k in ("gemv_ms", "mma_ms", "grouped_mm_ms") and v is not None)
        row["best_ours_ms"] = best
        row["auto_over_floor"] = row["auto_ms"] / row["floor_ms"] if row["auto_ms"] else None
        row["auto_over_hbm_floor"] = row["auto_ms"] / floor_hbm if row["auto_ms"] else None
        row["tf_over_auto"] = row["tf_grouped_mm_ms"] / row["auto_ms"] if row["auto_ms"] and row["tf_grouped_mm_ms"] else None
        rows.append(row)
        log(f"  time  {name:16s} T={t:5d} gemv={row.get('gemv_ms') or float('nan'):8.4f} "
            f"mma8/16/32={row.get('mma8_ms') or float('nan'):.4f}/{row.get('mma16_ms') or float('nan'):.4f}/{row.get('mma32_ms') or float('nan'):.4f} "
            f"grouped={row['grouped_mm_ms'] or float('nan'):8.4f} "
            f"auto[{row['auto_regime'][:4]}]={row['auto_ms'] or float('nan'):8.4f} eager={row['auto_eager_ms']:8.4f} "
            f"tf={row['tf_grouped_mm_ms'] or float('nan'):8.4f} gemms={row['grouped_mm_gemms_only_ms'] or float('nan'):8.4f} "
            f"loop={row.get('per_expert_loop_ms', float('nan')):8.3f} floor={row['floor_ms']:8.4f}")
    del experts
    torch.cuda.empty_cache()


def profile_eager(fmt: ExpertFormat, num_experts: int, top_k: int, views, gen, num_tokens: int, calls: int = 300) -> str:
    """Where the host time of an eager call goes (cProfile, top entries by own time)."""
    import cProfile
    import io
    import pstats

    table = make_slot_table(num_experts, views.num_slots, gen, DEV)
    ids, w = make_routing(num_tokens, num_experts, top_k, gen, DEV)
    hidden = torch.randn(num_tokens, fmt.hidden, generator=gen).to(DEV, fmt.dtype)
    for _ in range(5):
        fused_experts(hidden, ids, w, table, views, fmt)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(calls):
        fused_experts(hidden, ids, w, table, views, fmt)
    prof.disable()
    host_us = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
    return f"host time per eager call (T={num_tokens}, under cProfile): {host_us:.1f} us\n" + buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "h100_kernels.json"))
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--bench-tokens", default="1,16,64,256,1024,4096")
    args = ap.parse_args()
    t_start = time.time()
    gen = torch.Generator().manual_seed(2024)
    import cupy
    from cupy_backends.cuda.libs import nvrtc

    report: dict = {
        "command": "PYTHONPATH=python python3 benches/kernels_h100.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cupy": cupy.__version__,
        "nvrtc": ".".join(map(str, nvrtc.getVersion())),
        "python": platform.python_version(),
        "gemv_max_pairs_per_expert": configs.DEFAULT_CROSSOVERS.gemv_max_pairs_per_expert,
        "mma_max_pairs_per_expert": configs.DEFAULT_CROSSOVERS.mma_max_pairs_per_expert,
        "timing": "per-call median of CUDA-graph replays (4 calls with distinct routing per graph); eager = events around Python calls",
    }
    ceil = measure_ceilings()
    report["ceilings"] = ceil
    log(f"ceilings: {ceil}")
    checks: list[dict] = []
    times: list[dict] = []
    graph_checks: dict = {}
    bench_tokens = [int(x) for x in args.bench_tokens.split(",") if x]
    for name in args.shapes.split(","):
        fmt, num_experts, top_k = SHAPES[name]
        num_slots = num_experts + (3 if num_experts > 8 else 0)
        t0 = time.time()
        _, views = make_slots(fmt, num_slots, DEV, gen)
        if not args.skip_check:
            check_shape(name, fmt, num_experts, top_k, views, gen, checks)
            if name == "gpt-oss-20b":
                graph_checks = check_graph(fmt, num_experts, top_k, views, gen)
                log(f"  graph capture+replay errors: {graph_checks}")
        if name == "qwen3-30b-a3b" and not args.skip_bench:
            report["eager_profile"] = profile_eager(fmt, num_experts, top_k, views, gen, 1)
            log(report["eager_profile"][:3000])
        if not args.skip_bench:
            bench_shape(name, fmt, num_experts, top_k, views, gen, ceil, times, bench_tokens)
        del views, _
        torch.cuda.empty_cache()
        log(f"  [{name}: {time.time() - t0:.1f}s]")
    if not args.skip_check and "qwen3-30b-a3b" in args.shapes:
        fmt16 = ExpertFormat(2048, 768, torch.float16)
        _, views = make_slots(fmt16, 128, DEV, gen)
        for t in (1, 64, 1024):
            ids, w = make_routing(t, 128, 8, gen, DEV, dead_experts=8)
            table = make_slot_table(128, 128, gen, DEV, missing=8)
            hidden = torch.randn(t, 2048, generator=gen).to(DEV, torch.float16)
            poison()
            err = rel_error(fused_experts(hidden, ids, w, table, views, fmt16), fused_experts_fp64(hidden, ids, w, table, views, fmt16))
            checks.append({"shape": "qwen3-30b-a3b-fp16", "T": t, "auto": err, "ok": err <= TOL})
            log(f"  check qwen3 fp16 T={t} auto={err:.2e}")
        del views, _
    report["checks"] = checks
    report["graph_checks"] = graph_checks
    report["all_checks_ok"] = all(c["ok"] for c in checks) and all(v <= TOL for v in graph_checks.values())
    report["timings"] = times
    report["wall_s"] = time.time() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
    log(f"\nall checks ok: {report['all_checks_ok']}  ({len(checks)} cases, max error "
        f"{max((max(v for k, v in c.items() if k in ('gemv', 'mma', 'grouped_mm', 'auto', 'accumulate')) for c in checks), default=0):.2e})")
    log(f"{'shape':16s} {'T':>5s} {'gemv':>7s} {'mma':>7s} {'grouped':>7s} {'auto ms':>8s} {'regime':>10s} {'tf gmm':>8s} {'gemms':>8s} {'loop':>8s} {'floor':>8s} {'x floor':>7s}")
    for r in times:
        log(f"{r['shape']:16s} {r['T']:5d} {r.get('gemv_ms') or float('nan'):7.4f} {r.get('mma_ms') or float('nan'):7.4f} "
            f"{r['grouped_mm_ms'] or float('nan'):7.4f} {r['auto_ms'] or float('nan'):8.4f} {r['auto_regime']:>10s} "
            f"{r['tf_grouped_mm_ms'] or float('nan'):8.4f} {r['grouped_mm_gemms_only_ms'] or float('nan'):8.4f} "
            f"{r.get('per_expert_loop_ms', float('nan')):8.3f} {r['floor_ms']:8.4f} {r['auto_over_floor'] or float('nan'):7.2f}")
    log(f"wall {report['wall_s']:.0f}s -> {args.out}")
    return 0 if report["all_checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
