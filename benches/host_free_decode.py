"""Host-free decode: tokens/s, host CPU time and miss traffic of an offloaded preset whose decode
step is one CUDA-graph replay, against transformers' all-resident model with the same step
captured (StaticCache + torch.cuda.CUDAGraph: `resident_graphed`), in one process.

Systems per budget: `resident_graphed`, `sida_graphed` (``model.generate``, routed to the graphed
greedy loop), `sida_eager` (``model.generate(..., sida_graphs=False)``: transformers' own loop,
decode layers still on the expert table); with ``--compile`` also `resident_compiled` and
`sida_compiled` (the graphed loops with the step under ``torch.compile`` first); with
``--sampled`` also `resident_*_sampled` and `sida_*_sampled` (seeded sampling in the graphed,
or with ``--compile`` the compiled, loops). Every system is warmed up, then timed over ``--rounds``
interleaved rounds; decode time per token = (t(N new tokens) - t(1 new token)) / (N - 1), both
calls in the same round, so prefill and the first token cancel. CPU per step of the graphed
systems: ``CPU_PROBE_STEPS`` back-to-back replays of the captured step after each round, by
thread (``replay_probes.replay_back_to_back``); of ``sida_eager``: the calls' difference, like
the time. JSON (median and spread) to --out.

Routing (``--routings``): the routers' own (``model``), uniform random experts (``random``), or a
trained model's recorded routing replayed (``replay:PATH``, ``sida_moe/bench/replay.py``: the preset's
layers mapped onto the trace's, all on the device, so captured steps replay it too). For every
routing but ``model`` each budget also gets ``cache_sim``: an untimed pass of the eager greedy loop
(``--sim-tokens`` new tokens) through a cold cache of the same slots, recording every visit (a host
sync per layer), then that visit sequence run through each policy alone with the same slots
(``simulate_policy``: the cache's own policy code, each visit on the path it took, no GPU): Belady (the predictive policy fed the sequence
itself), LRU and FIFO (with the per-layer fair share, as the cache runs them) and LFU, next to the
real cache's hit rate in that pass (``real``; it differs from the replayed one of its policy only
by loads still in flight at a later visit).

    python benches/host_free_decode.py --preset qwen3-30b-a3b --budgets 25%,100% --out h200_host_free_decode.json
    python benches/host_free_decode.py --routings replay:benches/data/qwen3moe_128x8_stdlib_routing.npz,random \\
        --batches 1,8 --budgets 25%,100% --out replay.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sida_moe.visit_trace import VisitRecorder
import sida_moe
from sida_moe.bench.policy_replay import policy_hit_rates
from sida_moe.bench.replay import ReplayRouting, RoutingTraceError, load_routing_trace
from sida_moe.bench.replay_probes import replay_back_to_back, replay_host_seconds  # noqa: E402
from sida_moe.decode_graph import static_generate
from sida_moe.presets import PRESETS
from sida_moe.preset_models import build_model, build_offloaded
from sida_moe.sampling import SamplingParams

CPU_PROBE_STEPS = 32
SAMPLING = {"temperature": 0.7, "top_k": 50, "top_p": 0.9}  # the sampled rows (--sampled)


def _seeded(call):
    torch.manual_seed(0)  # every sampled call draws the same tokens for the same logits
    return call()



def route_randomly(model, num_experts: int) -> list:
    """Replace every MoE layer's routing by uniform random experts (drawn on the device, inside
    captured steps too): no locality for any cache, the worst case for misses. Returns the hooks."""
    return [module.register_forward_pre_hook(
                lambda m, a: (a[0], torch.randint(0, num_experts, a[1].shape, device=a[1].device, dtype=a[1].dtype), a[2]))
            for name, module in model.named_modules() if name.endswith("mlp.experts")]


def parse_routings(spec: str, preset: str) -> list[tuple[str, object]]:
    """``(label, trace or None)`` per routing; a replay trace is read and checked against the
    preset here, before minutes of model building."""
    out = []
    for item in spec.split(","):
        if item in ("model", "random"):
            out.append((item, None))
        elif item.startswith("replay:"):
            if any(label == "replay" for label, _ in out):
                raise SystemExit("--routings: one replay trace per run (its rows are labelled 'replay')")
            try:
                trace = load_routing_trace(item.removeprefix("replay:"))
            except RoutingTraceError as e:
                raise SystemExit(str(e)) from None
            cfg = PRESETS[preset].config if preset in PRESETS else {}
            want = (cfg.get("num_experts"), cfg.get("num_experts_per_tok"))
            if None not in want and want != (trace.num_experts, trace.top_k):
                raise SystemExit(f"{trace.path}: recorded with {trace.num_experts} experts top-{trace.top_k}; preset "
                                 f"{preset} has {want[0]} experts top-{want[1]}")
            out.append(("replay", trace))
        else:
            raise SystemExit(f"--routings: unknown routing {item!r} (model, random or replay:PATH)")
    return out


def set_routing(label: str, trace, models: list, num_experts: int) -> list:
    """Hooks that give ``models`` the routing ``label``; each model gets its own replay counter."""
    if label == "random":
        return [h for m in models for h in route_randomly(m, num_experts)]
    if label == "replay":
        return [ReplayRouting(m, trace) for m in models]
    return []


def cache_sim(engine, offloaded, ids: torch.Tensor, new_tokens: int, policy: str) -> dict:
    """Untimed: the eager greedy loop through a cold cache of the same slots with every visit
    recorded, then that visit sequence run through each policy alone (``policy_hit_rates``)."""
    slots = engine.num_slots
    engine.reopen_cache(slots, policy)  # cold: the real cache and the replayed ones start alike
    t0 = time.perf_counter()
    with torch.inference_mode(), engine.observe(VisitRecorder()) as recorder:
        visits = recorder.trace
        static_generate(offloaded, ids, new_tokens, graphs=False)
    real = engine.stats()
    record_s = time.perf_counter() - t0
    rates = {"real": real["hits"] / max(1, real["hits"] + real["misses"]),
             **policy_hit_rates(slots, visits, ("belady", "lru", "fifo", "lfu"))}
    return {
        "hit_rate": rates,
        "real_over_belady": rates["real"] / rates["belady"] if rates["belady"] else None,
        "real_policy": policy,
        "slots": slots,
        "visits": len(visits),
        "table_visits": sum(visits.through_table),
        "lookups": sum(len(set(experts)) for _, experts in visits),
        "real_lookups": int(real["hits"] + real["misses"]),  # the same: same visits, each expert once per visit
        "distinct_experts": len({(l, e) for l, es in visits for e in es}),  # misses every policy pays from cold
        "real_dropped_loads": int(real.get("routed_dropped", 0)),
        "tokens_per_row": ids.shape[1] + new_tokens - 1,
        "record_s": record_s,
        "replay_s": time.perf_counter() - t0 - record_s,
    }


def enqueue_ms(model, batch: int, compiled: bool = False, sampled: bool = False) -> float:
    """Host ms to launch one replay of the step the calls of ``batch`` rows captured and hand its
    routing over, the device idle before each (``replay_probes.replay_host_seconds``)."""
    seconds = replay_host_seconds(model, batch, compiled=compiled, sampled=sampled)
    return float("nan") if seconds is None else seconds * 1e3


def thread_cpu_by_name() -> dict[str, float]:
    """CPU seconds of this process's threads so far, summed by thread name (Linux /proc; the
    native cache names its threads sida-copy-N and sida-deferred-prefetch): which thread the
    process CPU column goes to."""
    import os

    tick, out = os.sysconf("SC_CLK_TCK"), {}
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        name = name.rstrip("0123456789") or name  # sida-copy-0, sida-copy-1 -> sida-copy-
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def timed(fn, device) -> tuple[float, float, float, object, dict[str, float]]:
    torch.cuda.synchronize(device)
    before = thread_cpu_by_name()
    w0, p0, t0 = time.perf_counter(), time.process_time(), time.thread_time()
    result = fn()
    torch.cuda.synchronize(device)
    wall, proc, thread = time.perf_counter() - w0, time.process_time() - p0, time.thread_time() - t0
    after = thread_cpu_by_name()
    by_name = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}
    return wall, proc, thread, result, by_name


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--budgets", default="25%,100%")
    ap.add_argument("--batches", default="1", help="comma-separated batch sizes")
    ap.add_argument("--routings", default="model",
                    help="comma-separated: 'model' (the routers), 'random' (uniform random experts per token and layer: "
                         "no locality), 'replay:PATH' (a trained model's recorded routing, sida_moe/bench/replay.py)")
    ap.add_argument("--sim-tokens", type=int, default=None,
                    help="new tokens of the untimed cache-simulation pass (default --new-tokens; 0: no pass)")
    ap.add_argument("--same-weights", action="store_true",
                    help="offload a second build of the resident model (same weights) instead of building in place")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--experts-impl", default="batched_mm", help="resident model's transformers experts implementation")
    ap.add_argument("--compile", action="store_true",
                    help="also time both graphed loops with the step compiled first (resident_compiled, sida_compiled)")
    ap.add_argument("--sampled", action="store_true",
                    help=f"also time seeded sampling ({SAMPLING}) in the graphed (or with --compile the compiled) loops")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    routings = parse_routings(args.routings, args.preset)

    device = torch.device("cuda")
    torch.manual_seed(0)
    report: dict = {"args": vars(args), "device": torch.cuda.get_device_name(device), "rows": {}}

    t0 = time.perf_counter()
    resident_model = build_model(args.preset, device=device, dtype=torch.bfloat16)
    resident_model.set_experts_implementation(args.experts_impl)
    report["build_resident_s"] = time.perf_counter() - t0
    budgets = [b.strip() for b in args.budgets.split(",")]
    t0 = time.perf_counter()
    if args.same_weights:
        # a second build of the resident model (same seed: same weights), offloaded: rows comparable token by token
        offloaded = sida_moe.offload(build_model(args.preset, device=device, dtype=torch.bfloat16), gpu_budget=budgets[0],
                                     policy=args.policy, prefetch="none")
        torch.cuda.empty_cache()
    else:
        offloaded = build_offloaded(args.preset, budgets[0], device=device, dtype=torch.bfloat16, policy=args.policy,
                                    prefetch="none")
    engine = sida_moe.engine_of(offloaded)
    report["build_offloaded_s"] = time.perf_counter() - t0

    print(f"built in {report['build_resident_s']:.0f} + {report['build_offloaded_s']:.0f} s; {engine.describe()}", flush=True)

    for routing, trace in routings:
        hooks = set_routing(routing, trace, [resident_model, offloaded], engine.layers[0].num_experts)
        if trace is not None:
            report["replay"] = {"path": trace.path, "metadata": trace.metadata, "layer_map": hooks[0].layer_map,
                                "copies": hooks[0].copies, "weights": "the routers' top-k weights (ids replaced)"}
        args.routing = routing
        for batch in [int(b) for b in args.batches.split(",")]:
            ids = torch.randint(3, 1000, (batch, args.prompt_len), device=device, generator=torch.Generator(device).manual_seed(batch))
            for budget in budgets:
                try:
                    run_batch(args, report, budget, engine, resident_model, offloaded, ids)
                except torch.OutOfMemoryError as e:  # e.g. bs8 at 100% beside the resident model: the rest goes on
                    for m in (resident_model, offloaded):
                        m.__dict__.pop("_sida_decode_steps", None)
                    torch.cuda.empty_cache()
                    reason = str(e).splitlines()[0][:160]
                    print(f"[{routing} bs{batch} {budget}] skipped: out of device memory ({reason})", flush=True)
                    report.setdefault("skipped_out_of_memory", []).append(f"{routing} bs{batch} {budget}: {reason}")
        for h in hooks:
            h.remove()
        # captured steps keep the routing they were captured with: the next routing captures anew
        torch.cuda.synchronize(device)
        for m in (resident_model, offloaded):
            m.__dict__.pop("_sida_decode_steps", None)


def run_batch(args, report, budget, engine, resident_model, offloaded, ids) -> None:
    device, batch = ids.device, ids.shape[0]
    systems = {
        # the same graphed greedy loop over transformers' own resident model
        "resident_graphed": lambda n: static_generate(resident_model, ids, n, graphs=True),
        # EOS off: every timed call makes its N tokens (the loop stops early once every row has finished)
        "sida_graphed": lambda n: offloaded.generate(ids, max_new_tokens=n, do_sample=False, sida_graphs=True,
                                                     eos_token_id=None),
        "sida_eager": lambda n: offloaded.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                   sida_graphs=False),
    }
    if args.compile:
        # the same graphed loops with the step compiled first (torch.compile, inductor)
        systems["resident_compiled"] = lambda n: static_generate(resident_model, ids, n, graphs=True, compile=True)
        systems["sida_compiled"] = lambda n: offloaded.generate(ids, max_new_tokens=n, do_sample=False, sida_compile=True,
                                                                eos_token_id=None)
    if args.sampled:
        # seeded sampling (SAMPLING) in the same loops, compiled when --compile
        compiled = "compiled" if args.compile else "graphed"
        systems[f"resident_{compiled}_sampled"] = lambda n: _seeded(lambda: static_generate(
            resident_model, ids, n, graphs=True, compile=args.compile, sampling=SamplingParams(**SAMPLING)))
        systems[f"sida_{compiled}_sampled"] = lambda n: _seeded(lambda: offloaded.generate(
            ids, max_new_tokens=n, do_sample=True, **SAMPLING, sida_compile=args.compile, eos_token_id=None))
    graphed = [name for name in systems if name != "sida_eager"]
    offloaded_graphed = [name for name in graphed if name.startswith("sida_")]
    n = args.new_tokens
    if engine.num_slots != engine.slots_for(budget):
        engine.reopen_cache(engine.slots_for(budget), args.policy)
    if args.routing == "model":
        with torch.inference_mode():
            want = resident_model(input_ids=ids).logits[:, -1].float()
            got = offloaded(input_ids=ids).logits[:, -1].float()
        top2 = want.topk(2, dim=-1).values
        logit_check = {"max_abs_diff": float((want - got).abs().max()), "max_abs_logit": float(want.abs().max()),
                       "min_top2_margin": float((top2[:, 0] - top2[:, 1]).min()),
                       "same_argmax": bool(torch.equal(want.argmax(-1), got.argmax(-1)))}
    else:
        logit_check = None
    rows = {name: {"decode_ms": [], "host_cpu_ms": [], "thread_cpu_ms": [], "threads_cpu_s": {}, "tokens": None}
            for name in systems}
    misses = {name: {"misses": [], "copied": [], "hit_rate": []} for name in offloaded_graphed}
    enqueue = {name: [] for name in graphed}
    for name, fn in systems.items():  # warm-up: compile kernels, capture graphs, fill the cache
        t0 = time.perf_counter()
        fn(4)
        fn(n)
        report.setdefault("warmup_s", {})[f"{args.routing}_bs{batch}_{budget}_{name}"] = time.perf_counter() - t0
    for r in range(args.rounds):
        order = list(systems) if r % 2 == 0 else list(reversed(systems))
        for name in order:
            fn, row = systems[name], rows[name]
            engine.reset_stats()
            w1, p1, t1, _, c1 = timed(lambda: fn(1), device)
            s1 = engine.stats()
            engine.reset_stats()
            wn, pn, tn, tokens, cn = timed(lambda: fn(n), device)
            if name in misses:
                # decode only: the N-token call's counters less the 1-token call's (prefill)
                sn = engine.stats()
                d = {k: sn[k] - s1[k] for k in ("hits", "misses", "bytes_copied")}
                lookups = d["hits"] + d["misses"]
                misses[name]["misses"].append(d["misses"] / (n - 1))
                misses[name]["copied"].append(d["bytes_copied"] / (n - 1))
                misses[name]["hit_rate"].append(d["hits"] / lookups if lookups else 0.0)
            row["decode_ms"].append((wn - w1) * 1e3 / (n - 1))
            if name in enqueue:
                model = resident_model if name.startswith("resident") else offloaded
                kind = {"compiled": "_compiled" in name, "sampled": name.endswith("_sampled")}
                enqueue[name].append(enqueue_ms(model, batch, **kind))
                # CPU of decode steps alone: back-to-back replays (a call's prefill is not in it)
                _, pb, tb, _, cb = timed(lambda: replay_back_to_back(model, batch, CPU_PROBE_STEPS, **kind), device)
                row["host_cpu_ms"].append(pb * 1e3 / CPU_PROBE_STEPS)
                row["thread_cpu_ms"].append(tb * 1e3 / CPU_PROBE_STEPS)
                for k, v in cb.items():
                    row["threads_cpu_s"][k] = row["threads_cpu_s"].get(k, 0.0) + v / CPU_PROBE_STEPS * (n - 1)
            else:
                row["host_cpu_ms"].append((pn - p1) * 1e3 / (n - 1))
                row["thread_cpu_ms"].append((tn - t1) * 1e3 / (n - 1))
                for k in set(c1) | set(cn):  # jiffies: meaningful summed over rounds, not per call
                    row["threads_cpu_s"][k] = row["threads_cpu_s"].get(k, 0.0) + cn.get(k, 0.0) - c1.get(k, 0.0)
            row["tokens"] = tokens[:, args.prompt_len:].tolist()
        print(f"[{args.routing} bs{batch} {budget}] round {r}: " + ", ".join(f"{k} {v['decode_ms'][-1]:.2f} ms" for k, v in rows.items()), flush=True)
    out = {"logit_check": logit_check}
    ref = rows["resident_graphed"]["tokens"]
    for name, row in rows.items():
        d = summary(row["decode_ms"])
        out[name] = {
            "decode_ms_per_step": d,
            "decode_tokens_per_s": {k: (1e3 * batch / v if k != "n" else v) for k, v in d.items()},
            "host_cpu_ms_per_step": summary(row["host_cpu_ms"]),
            "inference_thread_cpu_ms_per_step": summary(row["thread_cpu_ms"]),
            # decode CPU per step by thread name, over all rounds
            "threads_cpu_ms_per_step": {k: v * 1e3 / (args.rounds * (n - 1)) for k, v in row["threads_cpu_s"].items()},
            "cpu_method": (f"{CPU_PROBE_STEPS} back-to-back replays of the captured step between two drains "
                           "(replay_probes.replay_back_to_back)" if name in enqueue
                           else "(N-token call - 1-token call) / (N - 1)"),
            "same_tokens_as_resident_graphed": row["tokens"] == ref,
            "same_tokens_as_sida_eager": row["tokens"] == rows["sida_eager"]["tokens"],
            "first_tokens": row["tokens"][0][:16],
        }
        if name in enqueue:
            out[name]["host_enqueue_ms_per_step"] = summary(enqueue[name])
    expert_bytes = engine.pool.expert_nbytes
    for name, m in misses.items():
        out[name]["hit_rate"] = summary(m["hit_rate"])
        out[name]["zero_copy_miss_bytes_per_step"] = summary([x * expert_bytes for x in m["misses"]])
        out[name]["copied_bytes_per_step"] = summary(m["copied"])
    out["engine"] = engine.describe()
    sim_tokens = n if args.sim_tokens is None else args.sim_tokens
    if args.routing != "model" and sim_tokens > 0:
        out["cache_sim"] = cache_sim(engine, offloaded, ids, sim_tokens, args.policy)
    report["rows"][f"{args.routing}_bs{batch}_{budget}"] = out
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    for name in systems:
        r = out[name]
        extra = f", enqueue {r['host_enqueue_ms_per_step']['median']:.3f} ms/step" if name in enqueue else ""
        print(f"[{args.routing} bs{batch} {budget}] {name}: {r['decode_tokens_per_s']['median']:.1f} tok/s "
              f"({r['decode_tokens_per_s']['min']:.1f}-{r['decode_tokens_per_s']['max']:.1f}), process CPU "
              f"{r['host_cpu_ms_per_step']['median']:.2f} ms/step (thread {r['inference_thread_cpu_ms_per_step']['median']:.2f})"
              f"{extra}, by thread " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["threads_cpu_ms_per_step"].items()))
              + f", same tokens as resident {r['same_tokens_as_resident_graphed']} / as sida_eager "
              f"{r['same_tokens_as_sida_eager']}", flush=True)
    for name in misses:
        g = out[name]
        print(f"[{args.routing} bs{batch} {budget}] {name} hit rate {g['hit_rate']['median']:.3f}, zero-copy misses "
              f"{g['zero_copy_miss_bytes_per_step']['median'] / 1e6:.1f} MB/step, copied "
              f"{g['copied_bytes_per_step']['median'] / 1e6:.1f} MB/step", flush=True)
    print(f"[{args.routing} bs{batch} {budget}] logits {logit_check}", flush=True)
    if "cache_sim" in out:
        c = out["cache_sim"]
        print(f"[{args.routing} bs{batch} {budget}] cold-cache pass of {c['tokens_per_row']} tokens/row, {c['slots']} slots: "
              + ", ".join(f"{k} {v:.3f}" for k, v in c["hit_rate"].items())
              + f"; real/Belady {c['real_over_belady'] or 0:.2f} ({c['record_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
