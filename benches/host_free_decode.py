"""Host-free decode: tokens/s, host CPU time and miss traffic of an offloaded preset whose decode
step is one CUDA-graph replay, against transformers' all-resident model with the same step
captured (StaticCache + torch.cuda.CUDAGraph: `resident_graphed`), in one process.

Systems per budget: `resident_graphed`, `sida_graphed` (``model.generate``, routed to the graphed
greedy loop), `sida_eager` (``model.generate(..., sida_graphs=False)``: transformers' own loop,
decode layers still on the expert table). Every system is warmed up, then timed over ``--rounds``
interleaved rounds; decode time per token = (t(N new tokens) - t(1 new token)) / (N - 1), both
calls in the same round, so prefill and the first token cancel. JSON (median and spread) to --out.

    python benches/host_free_decode.py --preset qwen3-30b-a3b --budgets 25%,100% --out h200_host_free_decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import sida_moe
from sida_moe.decode_graph import greedy_generate
from sida_moe.presets import build_model, build_offloaded


def timed(fn, device) -> tuple[float, float, float, object]:
    torch.cuda.synchronize(device)
    w0, p0, t0 = time.perf_counter(), time.process_time(), time.thread_time()
    result = fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - w0, time.process_time() - p0, time.thread_time() - t0, result


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--budgets", default="25%,100%")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--experts-impl", default="batched_mm", help="resident model's transformers experts implementation")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    device = torch.device("cuda")
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (args.batch, args.prompt_len), device=device)
    report: dict = {"args": vars(args), "device": torch.cuda.get_device_name(device), "rows": {}}

    t0 = time.perf_counter()
    resident_model = build_model(args.preset, device=device, dtype=torch.bfloat16)
    resident_model.set_experts_implementation(args.experts_impl)
    report["build_resident_s"] = time.perf_counter() - t0
    budgets = [b.strip() for b in args.budgets.split(",")]
    t0 = time.perf_counter()
    offloaded = build_offloaded(args.preset, budgets[0], device=device, dtype=torch.bfloat16, policy=args.policy,
                                prefetch="none")
    engine = sida_moe.engine_of(offloaded)
    report["build_offloaded_s"] = time.perf_counter() - t0
    print(f"built in {report['build_resident_s']:.0f} + {report['build_offloaded_s']:.0f} s; {engine.describe()}", flush=True)

    systems = {
        # the same graphed greedy loop over transformers' own resident model
        "resident_graphed": lambda n: greedy_generate(resident_model, ids, n, graphs=True),
        "sida_graphed": lambda n: offloaded.generate(ids, max_new_tokens=n, do_sample=False, sida_graphs=True),
        "sida_eager": lambda n: offloaded.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                   sida_graphs=False),
    }
    n = args.new_tokens
    for bi, budget in enumerate(budgets):
        if bi:
            engine.reopen_cache(engine.slots_for(budget), args.policy)
        rows = {name: {"decode_ms": [], "host_cpu_ms": [], "thread_cpu_ms": [], "tokens": None} for name in systems}
        misses_per_token, copied_per_token, hit_rates = [], [], []
        for name, fn in systems.items():  # warm-up: compile kernels, capture graphs, fill the cache
            fn(4)
            fn(n)
        for r in range(args.rounds):
            order = list(systems) if r % 2 == 0 else list(reversed(systems))
            for name in order:
                fn = systems[name]
                w1, p1, t1, _ = timed(lambda: fn(1), device)
                if name.startswith("sida"):
                    engine.reset_stats()
                wn, pn, tn, tokens = timed(lambda: fn(n), device)
                if name.startswith("sida"):
                    st = engine.stats()
                    lookups = st["hits"] + st["misses"]
                    if name == "sida_graphed":
                        # stats of the N-token call: prefill acquires + N-1 decode steps' visits
                        misses_per_token.append(st["misses"] / max(n - 1, 1))
                        copied_per_token.append(st["bytes_copied"] / max(n - 1, 1))
                        hit_rates.append(st["hits"] / lookups if lookups else 0.0)
                row = rows[name]
                row["decode_ms"].append((wn - w1) * 1e3 / (n - 1))
                row["host_cpu_ms"].append((pn - p1) * 1e3 / (n - 1))
                row["thread_cpu_ms"].append((tn - t1) * 1e3 / (n - 1))
                row["tokens"] = tokens[:, args.prompt_len:].tolist()
            print(f"[{budget}] round {r}: " + ", ".join(f"{k} {v['decode_ms'][-1]:.2f} ms" for k, v in rows.items()), flush=True)
        out = {}
        ref = rows["resident_graphed"]["tokens"]
        for name, row in rows.items():
            d = summary(row["decode_ms"])
            out[name] = {
                "decode_ms_per_token": d,
                "decode_tokens_per_s": {k: (1e3 * args.batch / v if k != "n" else v) for k, v in d.items()},
                "host_cpu_ms_per_token": summary(row["host_cpu_ms"]),
                "inference_thread_cpu_ms_per_token": summary(row["thread_cpu_ms"]),
                "same_tokens_as_resident_graphed": row["tokens"] == ref,
                "first_tokens": row["tokens"][0][:16],
            }
        expert_bytes = engine.pool.expert_nbytes
        out["sida_graphed"]["hit_rate"] = summary(hit_rates)
        out["sida_graphed"]["zero_copy_miss_bytes_per_token"] = summary([m * expert_bytes for m in misses_per_token])
        out["sida_graphed"]["copied_bytes_per_token"] = summary(copied_per_token)
        out["engine"] = engine.describe()
        report["rows"][budget] = out
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        for name in systems:
            r = out[name]
            print(f"[{budget}] {name}: {r['decode_tokens_per_s']['median']:.1f} tok/s "
                  f"({r['decode_tokens_per_s']['min']:.1f}-{r['decode_tokens_per_s']['max']:.1f}), host CPU "
                  f"{r['host_cpu_ms_per_token']['median']:.2f} ms/token (thread {r['inference_thread_cpu_ms_per_token']['median']:.2f}), "
                  f"same tokens {r['same_tokens_as_resident_graphed']}", flush=True)
        print(f"[{budget}] sida_graphed hit rate {out['sida_graphed']['hit_rate']['median']:.3f}, zero-copy misses "
              f"{out['sida_graphed']['zero_copy_miss_bytes_per_token']['median'] / 1e6:.1f} MB/token", flush=True)


if __name__ == "__main__":
    main()
