"""End-to-end offload benchmark: an all-resident model vs the same model offloaded at several
expert budgets (identical greedy tokens, decode tokens/s, GPU memory, hit rate, bytes moved).

Phases (each timed): build the preset with random weights all on the device; greedy-generate with
it (the reference tokens and tokens/s); ``sida_moe.offload`` it (experts -> pinned pool, GPU copies
freed); then for each budget (largest first) reopen the slot cache, warm up, generate, compare.

    python benches/e2e_offload.py --preset qwen3-30b-a3b --budgets 1.0 0.5 0.25 0.1 \\
        --out benches/results/h100_offload_qwen3_30b.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

import sida_moe
from sida_moe.cli import _TokenClock
from sida_moe.preset_models import build_model
from sida_moe.byte_tokenizer import ByteTokenizer

PROMPT = "Mixture-of-Experts models route every token to a few experts, so most of the weights sit idle"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gib(n: float) -> float:
    return round(n / 2**30, 3)


def _generate(model, batch, new_tokens: int, device: torch.device) -> dict:
    clock = _TokenClock()
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock)
    _sync(device)
    total = time.perf_counter() - start
    steps = clock.times[1:]  # first put() is the prompt
    decode_s = steps[-1] - steps[0] if len(steps) > 1 else float("nan")
    return {
        "tokens": out[:, batch["input_ids"].shape[1]:].tolist(),
        "seconds": round(total, 4),
        "time_to_first_token_s": round(steps[0] - start, 4) if steps else None,
        "decode_tokens_per_s": round((len(steps) - 1) * out.shape[0] / decode_s, 3) if len(steps) > 1 else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-moe-tiny")
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--policy", default="lru")
    p.add_argument("--prefetch", nargs="+", default=["next_layer_gate"], help="prefetchers to run at each budget")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    result: dict = {
        "command": "python " + " ".join(sys.argv),
        "preset": args.preset,
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "new_tokens": args.new_tokens,
        "policy": args.policy,
        "phases_s": {},
        "runs": [],
    }
    phases = result["phases_s"]

    def save() -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    tokenizer = ByteTokenizer()
    batch = {k: v.to(device) for k, v in tokenizer([PROMPT]).items()}
    result["prompt_tokens"] = int(batch["input_ids"].shape[1])

    t = time.perf_counter()
    model = build_model(args.preset, device, dtype, seed=0)
    _sync(device)
    phases["build_all_resident"] = round(time.perf_counter() - t, 2)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":
        result["all_resident_gpu_allocated_gib"] = _gib(torch.cuda.memory_allocated(device))

    t = time.perf_counter()
    _generate(model, batch, 2, device)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reference = _generate(model, batch, args.new_tokens, device)
    with torch.inference_mode():
        ref_logits = model(**batch).logits[0, -1].float().cpu()
    if device.type == "cuda":
        reference["peak_gpu_gib"] = _gib(torch.cuda.max_memory_allocated(device))
    phases["generate_all_resident"] = round(time.perf_counter() - t, 2)
    result["all_resident"] = reference
    print(f"all-resident: {reference['decode_tokens_per_s']} tok/s decode", flush=True)
    save()

    t = time.perf_counter()
    model = sida_moe.offload(model, gpu_budget=max(args.budgets), policy=args.policy, prefetch=args.prefetch[0], progress=True)
    _sync(device)
    phases["offload"] = round(time.perf_counter() - t, 2)
    engine = model.sida_engine
    result["engine"] = engine.describe()
    result["dense_gib"] = _gib(sum(p.numel() * p.element_size() for p in model.parameters()))
    result["all_experts_gib"] = _gib(engine.num_experts_total * engine.expert_nbytes)
    save()

    first = True
    for budget in sorted(args.budgets, reverse=True):
        for prefetch in args.prefetch:
            t = time.perf_counter()
            try:
                if not first:
                    engine.reopen_cache(engine.slots_for(budget), args.policy)
                    engine.set_prefetcher(sida_moe.prefetchers.make_prefetcher(prefetch))
                first = False
                run = _offloaded_run(model, engine, batch, args.new_tokens, device, reference, ref_logits)
            except Exception as e:  # keep the other budgets' numbers; record what failed
                run = {"error": f"{type(e).__name__}: {e}"}
            run.update(budget=budget, prefetch=prefetch, seconds_total=round(time.perf_counter() - t, 2))
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
            save()
    phases["offloaded_runs"] = round(sum(r["seconds_total"] for r in result["runs"]), 2)
    save()
    engine.close()
    return 0


def _offloaded_run(model, engine, batch, new_tokens: int, device: torch.device, reference: dict, ref_logits: torch.Tensor) -> dict:
    """Warm up, generate, compare with the all-resident reference, collect the engine's stats."""
    _generate(model, batch, 2, device)  # warm-up (kernel builds, allocator)
    engine.reset_stats()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = _generate(model, batch, new_tokens, device)
    with torch.inference_mode():
        logits = model(**batch).logits[0, -1].float().cpu()
    stats = engine.stats()
    generated = len(run["tokens"][0])
    run.update(
        identical_tokens=run["tokens"] == reference["tokens"],
        last_logits_max_abs_diff=float((logits - ref_logits).abs().max()),
        ref_logits_max_abs=float(ref_logits.abs().max()),
        num_slots=int(stats["num_slots"]),
        slot_gib=_gib(stats["slot_bytes"]),
        hit_rate=round(stats["hit_rate"], 4),
        next_layer_gate_hit_rate=round(stats.get("prefetch_hit_rate", float("nan")), 4),
        bytes_moved_per_token_mib=round(stats["bytes_copied"] / generated / 2**20, 2),
        achieved_gbps=round(stats.get("achieved_gbps", 0.0), 2),
        host_stall_s=round(stats.get("host_stall_seconds", 0.0), 3),
    )
    if device.type == "cuda":
        run["peak_gpu_gib"] = _gib(torch.cuda.max_memory_allocated(device))
        run["gpu_allocated_gib"] = _gib(torch.cuda.memory_allocated(device))
    run.pop("tokens")
    return run


if __name__ == "__main__":
    sys.exit(main())
