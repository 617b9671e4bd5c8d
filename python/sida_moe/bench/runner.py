"""The end-to-end serving benchmark: one model, the same prompts, every system and configuration.

``run_bench(BenchConfig(...))`` returns the result rows (one per system / configuration and batch
size) and writes JSON, a markdown table and PNG plots when an output directory is given. Every
system is timed the same way (``timing``): warmed up, then a 1-token and an N-token call per
round, over interleaved rounds; offloaded rows are also held to their decode bound (``bound``).
"""

from __future__ import annotations

import contextlib
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sida_moe.bench.bound import attach_bounds, zero_copy_gbps
from sida_moe.bench import inputs
from sida_moe.bench.config import BenchConfig, bench_device, optional_parts
from sida_moe.bench.memory import peak_gib, reset_peak, skip_out_of_memory
from sida_moe.bench.metrics import (
    decode_cache_metrics,
    engine_metrics,
    host_ms,
    logit_agreement,
    median_of,
    teacher_forced_logits,
    token_agreement,
)
from sida_moe.bench.observers import StallTimer, SyncLoads
from sida_moe.bench.policy_replay import policy_hit_rates
from sida_moe.bench.report import markdown_table, plot_timeline, plot_vs_budget, write_json
from sida_moe.bench.systems import (
    GraphedResident,
    experts_on_cpu_with_accelerate,
    set_fastest_experts_implementation,
)
from sida_moe.bench.timeline import decode_timeline
from sida_moe.bench.timing import DecodeTiming, Round, decode_seconds_per_step, interleave, two_calls
from sida_moe.sampling import SamplingParams
from sida_moe.visit_trace import VisitRecorder

# ------------------------------------------------------------------------------------- the run
def run_bench(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Run every requested system and configuration; returns the result rows. Inputs are checked
    before the first row (:class:`BenchInputError`); an optional part this installation or device
    cannot run (the accelerate baseline, the plots, resident_graphed off CUDA) is skipped with a
    one-line note on stderr."""
    from tqdm.auto import tqdm

    from sida_moe.bench.replay_probes import replay_host_seconds
    from sida_moe.offloading import engine_of, offload

    cfg.validate()
    baselines, plots, note = optional_parts(cfg)
    device = bench_device(cfg)
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows: list[dict[str, Any]] = []
    from sida_moe.presets import PRESETS

    sample = cfg.model in PRESETS if cfg.sample is None else cfg.sample
    model = inputs.load_model(cfg, device, dtype)
    if note:  # once the model loaded: a bad checkpoint stays one line
        print(f"sida-moe bench: note: {note}", file=sys.stderr, flush=True)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    n_new = cfg.new_tokens
    meta: dict[str, Any] = {
        "config": dict(asdict(cfg)),
        "decoding": f"sampled (seed {cfg.seed})" if sample else "greedy",
        "timing": (f"each visit of a system: a warm-up call, then a 1-token and a {n_new}-token call; decode ms per step = "
                   f"(t({n_new}) - t(1)) / {n_new - 1}; median (and min, max) over {cfg.rounds} interleaved rounds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **({"skipped": note} if note else {}),
    }

    if cfg.routing_trace is not None:
        from sida_moe.bench.replay import load_routing_trace

        trace = load_routing_trace(cfg.routing_trace)  # checked by validate()
    else:
        trace = None
    replay = inputs.replay_routing(trace, model)
    if replay is not None:
        meta["routing"] = {"trace": cfg.routing_trace, "metadata": replay.trace.metadata, "layer_map": replay.layer_map,
                           "positions": ("round r: the warm-up call replays from position 2 r S, the timed calls "
                                         f"from (2 r + 1) S, S = {cfg.prompt_tokens + n_new} (prompt + new tokens), the "
                                         "same for every system: each round decodes routing its warm-up did not show "
                                         "the cache")}
    # where in the trace the next call replays from; visit() moves it per round
    replay_at = {"position": 0, "round": 0}
    stride = cfg.prompt_tokens + n_new

    def round_positions(r: int) -> tuple[int, int]:
        """(warm-up, timed calls) trace positions of round ``r``."""
        return 2 * r * stride, (2 * r + 1) * stride

    def from_start() -> None:
        if replay is not None:
            replay.reset(replay_at["position"])

    def gen(b: int, n: int, graphs: bool | None = None) -> torch.Tensor:
        from_start()
        return inputs.generate_new(model, prompts[b], n, sample, cfg.seed, graphs, cfg.compile)

    def gen_graphed(b: int, n: int) -> torch.Tensor:
        from_start()
        torch.manual_seed(cfg.seed)  # as inputs.generate_new: the same sampled sequence for every system
        return graphed.generate(prompts[b]["input_ids"], n, cfg.compile, SamplingParams(**inputs.SAMPLING) if sample else None,
                                prompts[b]["attention_mask"])

    def forced_logits(b: int) -> torch.Tensor:
        from_start()
        return teacher_forced_logits(model, prompts[b], reference[b])

    vocab = model.get_input_embeddings().num_embeddings
    text_ids = inputs.prompt_file_ids(cfg, vocab) if cfg.prompt_file else None
    prompts = {b: inputs.make_prompts(model, b, cfg.prompt_tokens, cfg.seed, device, text_ids) for b in cfg.batch_sizes}
    reference: dict[int, torch.Tensor] = {}
    reference_logits: dict[int, torch.Tensor] = {}  # the resident model's, teacher-forced on its tokens
    configs_per_budget = len(cfg.policies) * len(cfg.predictors) + sum(b in baselines for b in ("ondemand_lru", "sida_sync"))
    total = len(cfg.batch_sizes) * (len(cfg.budgets) * configs_per_budget + sum(
        b in baselines for b in ("resident", "accelerate_cpu", "resident_graphed")))
    bar = tqdm(total=total, desc="bench", unit="row", disable=not cfg.progress)

    def record(system: str, batch: int, rounds: list[Round], n: int, extra: dict[str, Any],
               tokens: bool = True) -> dict[str, Any]:
        timing = DecodeTiming(batch, cfg.prompt_tokens, n, rounds)
        row = {"system": system, "policy": "-", "predictor": "-", "budget_fraction": None, **timing.summary(),
               **host_ms(rounds, timing, device), **extra}
        row["batch_size"] = batch
        peaks = [r.extra.get("peak_gpu_gib") for r in rounds]
        row["peak_gpu_gib"] = max(peaks) if None not in peaks else None
        if tokens:
            row.update(token_agreement(rounds[-1].full.out.cpu(),
                                       reference.get(batch) if system != "resident" else None))
        if device.type == "cuda":
            row["gpu_allocated_gib"] = torch.cuda.memory_allocated(device) / 2**30
        rows.append(row)
        if out_dir:  # partial results survive a later failure
            write_json(out_dir / "bench.json", meta, rows)
        bar.set_postfix_str(f"{system} {extra.get('policy', '')} {row['decode_tokens_per_s']:.2f} tok/s")
        bar.update(1)
        return row

    def settled(engine):
        def before() -> None:
            # copies and routing the previous call left in flight would land inside the next
            # timed call (slowing its prefill, the 1-token call's most): drained first
            engine.quiesce()
            engine.reset_stats()
        return before

    def visit(generate, n: int, before_timing=None, after_timing=None, engine=None):
        """A visit: ``before_timing()`` (configure), a warm-up call, the two timed calls (the
        engine's counters reset before and read after each), ``after_timing(round)``. Its k-th
        run is round k: with a routing trace, the warm-up and the timed calls replay from that
        round's positions (``round_positions``)."""
        runs = [0]

        def run() -> Round:
            replay_at["round"], runs[0] = runs[0], runs[0] + 1
            warm, timed = round_positions(replay_at["round"])
            if before_timing is not None:
                before_timing()
            reset_peak(device)
            replay_at["position"] = warm
            generate(n)  # warm-up: kernels chosen, the decode step captured, the cache in its steady state
            replay_at["position"] = timed
            rnd = two_calls(generate, n, device, before=settled(engine) if engine is not None else None,
                            after=engine.stats if engine is not None else None)
            rnd.extra["peak_gpu_gib"] = peak_gib(device)
            if after_timing is not None:
                after_timing(rnd)
            return rnd
        return run

    # 1. all resident (also the reference tokens), and the same model with a graphed decode step
    resident_impl = None
    if "resident" in baselines:
        b0 = cfg.batch_sizes[0]
        resident_impl, impl_cost = set_fastest_experts_implementation(
            model, lambda: decode_seconds_per_step(lambda n: gen(b0, n), min(n_new, 12), device))
        meta["experts_implementation_s_per_decode_token"] = impl_cost
    graphed = GraphedResident(model) if "resident_graphed" in baselines else None
    graphed_impl = None
    if graphed is not None:
        bg = cfg.batch_sizes[0]
        # eager's per-expert loop reads routing on the host: it cannot be captured
        graphed_impl, graphed_cost = set_fastest_experts_implementation(
            model, lambda: decode_seconds_per_step(lambda n: gen_graphed(bg, n), min(n_new, 12),
                                                   device), candidates=["grouped_mm", "batched_mm"])
        meta["resident_graphed_experts_implementation_s_per_decode_token"] = graphed_cost
        if not graphed_cost:
            print("sida-moe bench: note: skipping resident_graphed: no experts implementation could be captured",
                  file=sys.stderr, flush=True)
            graphed = None

    def uses(impl: str | None):
        return (lambda: model.set_experts_implementation(impl)) if impl is not None else None

    def add_enqueue(b: int):
        def after(rnd: Round) -> None:
            probe = replay_host_seconds(model, b, compiled=cfg.compile)
            rnd.extra["enqueue_ms"] = probe * 1e3 if probe is not None else None
        return after

    for b in cfg.batch_sizes:
        visits = {}
        if "resident" in baselines:
            visits["resident"] = visit(lambda n, b=b: gen(b, n), n_new, uses(resident_impl))
        if graphed is not None:
            visits["resident_graphed"] = visit(lambda n, b=b: gen_graphed(b, n), n_new,
                                               uses(graphed_impl), add_enqueue(b))
        if not visits:
            continue
        try:
            timed_rounds = interleave(visits, cfg.rounds)
        except (torch.OutOfMemoryError, MemoryError) as e:
            skip_out_of_memory(meta, model, device, f"the resident baselines at batch {b}", e)
            bar.update(len(visits))
            continue
        if "resident" in timed_rounds:
            model.set_experts_implementation(resident_impl)
            reference[b] = timed_rounds["resident"][-1].full.out.cpu()
            reference_logits[b] = forced_logits(b)
            record("resident", b, timed_rounds["resident"], n_new, {"experts_implementation": resident_impl,
                                                                    "decode_loop": "eager"})
        if "resident_graphed" in timed_rounds:
            extra = {"experts_implementation": graphed_impl, "decode_loop": "graph replay"}
            record("resident_graphed", b, timed_rounds["resident_graphed"], n_new, extra)
    if resident_impl is not None:
        model.set_experts_implementation(resident_impl)
    # 2. transformers + accelerate, experts on the CPU (slow: fewer tokens, one round)
    if "accelerate_cpu" in baselines:
        n_acc = max(2, cfg.accelerate_new_tokens)
        with experts_on_cpu_with_accelerate(model, device):
            for b in cfg.batch_sizes:
                rnd = visit(lambda n, b=b: gen(b, n), n_acc)()
                record("accelerate_cpu", b, [rnd], n_acc, {"decode_loop": "eager"}, tokens=False)
    # 3. sida-moe
    budgets = sorted(cfg.budgets, reverse=True)  # largest slot memory first, while the GPU is emptiest
    t0 = time.perf_counter()
    if replay is not None:
        replay.remove()  # its hooks sit on the experts modules that offload replaces
    offload(model, gpu_budget=min(budgets), policy="lru", prefetch="none", progress=cfg.progress)
    replay = inputs.replay_routing(trace, model)
    engine = engine_of(model)
    meta["offload_seconds"] = time.perf_counter() - t0
    meta["engine"] = engine.describe()
    if device.type == "cuda":
        meta["gpu_allocated_after_offload_gib"] = torch.cuda.memory_allocated(device) / 2**30
    observing = contextlib.ExitStack()  # the engine's observers, for the rest of the run
    observing.enter_context(engine.observe(StallTimer()))
    syncing = contextlib.ExitStack()  # SyncLoads for the sida_sync configuration's calls
    for b in cfg.batch_sizes:  # warm-up: kernels compiled and selected before anything is timed
        gen(b, 2)
    # the bound's link term: only on CUDA is the pool read over a link
    gbps = {b: zero_copy_gbps(engine, b) if device.type == "cuda" else None for b in cfg.batch_sizes}
    meta["zero_copy_gbps"] = {str(b): v for b, v in gbps.items()}

    recorded: dict[tuple[int, float], tuple[Any, int]] = {}  # (batch, budget): the last recording, where its N-token call starts

    def record_future(b: int, budget: float, r: int) -> list:
        """Belady's future for round ``r`` of a visit at batch ``b``: the visit sequence of its
        warm-up, 1-token and N-token calls, the same under every policy and prefetcher in exact
        mode; recorded on transformers' loop (a replayed step makes its visits off the host)."""
        configure(budget, "lru", "none", False, None)()
        warm, timed = round_positions(r)
        with engine.observe(VisitRecorder()) as recorder:
            trace = recorder.trace
            for n, at in ((n_new, warm), (1, timed), (n_new, timed)):
                replay_at["position"] = at
                start = len(trace)
                gen(b, n, graphs=False)
        recorded[b, budget] = (trace, start)
        return list(trace)

    def configure(budget: float, policy: str, predictor: str, sync: bool, future: list | None, b: int = 0):
        def before() -> None:
            # a replayed trace moves on every round: its future is recorded per round
            seen = record_future(b, budget, replay_at["round"]) if policy == "belady" and replay is not None else future
            engine.reopen_cache(engine.slots_for(budget), "predictive" if policy == "belady" else policy)
            engine.set_prefetcher(inputs.prefetcher_for(predictor, cfg, oracle=policy == "belady"))
            if sync:
                syncing.enter_context(engine.observe(SyncLoads()))
            if seen is not None:
                engine.set_future(seen)
        return before

    def observe(b: int, agreement: dict[str, Any]):
        def after(rnd: Round) -> None:
            syncing.close()
            rnd.extra["decode"] = decode_cache_metrics(rnd.first_seen, rnd.full_seen, n_new - 1, engine.expert_nbytes)
            rnd.extra["table_decode"] = all(engine.uses_table(layer.ordinal, b) for layer in engine.layers)
            graph_replays = rnd.extra["decode"]["decode_eager_steps"] == 0
            probe = replay_host_seconds(model, b, compiled=cfg.compile) if graph_replays else None
            rnd.extra["enqueue_ms"] = probe * 1e3 if probe is not None else None
            # once per configuration, untimed, in the last round: the reference's (a trace's positions move per round)
            if not agreement and b in reference_logits and replay_at["round"] == cfg.rounds - 1:
                agree = token_agreement(rnd.full.out.cpu(), reference[b])
                agreement.update(logit_agreement(forced_logits(b),
                                                 reference_logits[b], agree.get("first_token_differing_from_resident")))
        return after

    def configs_for() -> list[tuple[str, str, str, bool]]:
        configs = [("sida", p, q, False) for p in cfg.policies for q in cfg.predictors]
        if "ondemand_lru" in baselines:
            configs.append(("ondemand_lru", "lru", "none", False))
        if "sida_sync" in baselines:
            configs.append(("sida_sync", "fifo", "none", True))
        return configs

    def measure_budget(b: int, budget: float):
        """Every configuration at batch ``b`` and ``budget``, interleaved: (rounds, configs, agreements)."""
        # without a trace every round makes the same visits: one recording serves them all
        future = record_future(b, budget, 0) if "belady" in cfg.policies and replay is None else None
        configs = configs_for()
        visits, agreements = {}, {}
        for system, policy, predictor, sync in configs:
            key = f"{system} {policy} {predictor}"
            agreements[key] = {}
            visits[key] = visit(lambda n, b=b: gen(b, n), n_new,
                                configure(budget, policy, predictor, sync, future if policy == "belady" else None, b),
                                observe(b, agreements[key]), engine)
        return interleave(visits, cfg.rounds), configs, agreements

    for b in cfg.batch_sizes:
        for budget in budgets:
            try:
                timed_rounds, configs, agreements = measure_budget(b, budget)
            except (torch.OutOfMemoryError, MemoryError) as e:
                # a large budget next to what the process already holds: the smaller budgets go on
                skip_out_of_memory(meta, model, device, f"batch {b} at a {budget:.0%} budget", e)
                bar.update(len(configs_for()))
                continue
            # the policies alone on the visits the rows made (the last recorded round's)
            trace, start = recorded.get((b, budget), (None, 0))
            alone = policy_hit_rates(engine.num_slots, trace, sorted({c[1] for c in configs}), start) if trace is not None else {}
            for system, policy, predictor, sync in configs:
                key = f"{system} {policy} {predictor}"
                rr = timed_rounds[key]
                last = rr[-1]
                decode = median_of([r.extra["decode"] for r in rr])
                graph_replays = decode["decode_eager_steps"] == 0
                extra = {"policy": policy, "predictor": predictor, "budget_fraction": budget,
                         "decode_loop": "graph replay" if graph_replays else "eager",
                         "decode_misses_served": ("in place (zero-copy)" if last.extra["table_decode"]
                                                  else "copied into slots"),
                         **decode,
                         **engine_metrics(last.full_seen, b * (cfg.prompt_tokens + n_new), last.full.wall_s, engine.expert_nbytes),
                         **({"policy_hit_rate": alone[policy]} if policy in alone else {}),
                         **agreements[key]}
                record(system, b, rr, n_new, extra)
    bar.close()
    attach_bounds(rows, gbps)

    if out_dir:
        out = out_dir
        write_json(out / "bench.json", meta, rows)
        (out / "bench.md").write_text(markdown_table(rows))
    if out_dir and plots:
        b0 = cfg.batch_sizes[0]
        first = [r for r in rows if r["batch_size"] == b0]
        plot_vs_budget(first, "decode_tokens_per_s", "decode tokens/s", out / "tokens_per_s_vs_budget.png")
        plot_vs_budget([r for r in first if r.get("hit_rate") is not None], "hit_rate", "cache hit rate", out / "hit_rate_vs_budget.png")
        if cfg.timeline and device.type == "cuda":
            mid = sorted(cfg.budgets)[len(cfg.budgets) // 2]
            engine.reopen_cache(engine.slots_for(mid), "lru")
            engine.set_prefetcher(inputs.prefetcher_for("next_layer_gate" if "next_layer_gate" in cfg.predictors else cfg.predictors[0], cfg))
            plot_timeline(decode_timeline(model, prompts[b0], device), out / "timeline.png")
    syncing.close()
    observing.close()
    engine.close()
    return rows
