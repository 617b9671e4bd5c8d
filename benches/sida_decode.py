"""Decode of a trained checkpoint with and without SiDA's predictor: tokens/s, hit rate, the
predictor's recall, and whether the greedy tokens equal the original model's, in one process.

Systems (each through ``model.generate``, greedy; on CUDA the decode step is one graph replay):
- ``resident_graphed``: the checkpoint loaded by transformers, all on the device, the same graphed
  greedy loop (``sida_moe.decode_graph.static_generate``);
- ``none_lru``: ``from_pretrained`` at ``--budget``, no prefetch, LRU;
- ``sida``: the same with the checkpoint's trained predictor and the predictive policy;
- with ``--dry``, also ``sida_dry``: ``none_lru`` (LRU) with the predictor run in every decode step
  but its predictions never handed to the cache (``_ComputeOnly``): the predictor's own cost;
- with ``--policy-only``, also ``sida_policy_only``: the predictor with ``prefetch=False`` (its
  predictions steer the predictive policy's eviction and admission, no copies of their own);
- with ``--late-copies``, also ``sida_late_copies``: ``sida`` with a replayed step's predictions
  copied too (``_LateCopies``; the serving prefetcher feeds them to the policy only);
- with ``--fp32-decode``, also ``sida_fp32_decode``: ``sida`` with the predictor's decode steps in
  float32 (``decode_dtype``; ``sida`` runs them in bfloat16, the CUDA default);
- with ``--in-flight-variant N``, also ``none_lru_ifN`` and ``sida_ifN``: ``none_lru`` and ``sida`` as
  models of their own whose steps are captured with ``N`` replays in flight (compiled with ``--compile``);
- with ``--priority-variant``, also ``none_lru_hi`` and ``sida_hi``: ``none_lru`` and ``sida`` as models
  of their own built and run on a high-priority stream (compiled with ``--compile``), so the
  predictor's side stream (default priority, the lowest) yields the SMs to the decode step;
- with ``--compile``, also ``resident_compiled``, ``none_lru_compiled`` and ``sida_compiled``: the
  same loops with the step (and the predictor's step beside it) under ``torch.compile`` first.
Prompts are held-out text (the Python standard library's sources), ``--prompt-len`` tokens each.
Every system is warmed up, then timed over ``--rounds`` interleaved rounds; decode time per token =
(t(N new tokens) - t(1 new token)) / (N - 1) within a round; median and spread to ``--out``.

    python benches/sida_decode.py --out h200_sida_decode.json            # the bundled checkpoint
    python benches/sida_decode.py --model /path/ckpt --budget 25% --batches 1,8 --out ...
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import sys
import sysconfig

import torch

sys.path.insert(0, os.path.dirname(__file__))
from host_free_decode import enqueue_ms, summary, timed  # noqa: E402

import sida_moe  # noqa: E402
from sida_moe.decode_graph import static_generate  # noqa: E402
from sida_moe.offloading import from_pretrained  # noqa: E402
from sida_moe.predictor import HashPredictor, SidaPrefetcher, load_prefetcher  # noqa: E402

BUNDLED = os.path.join(os.path.dirname(sida_moe.__file__), "models", "qwen3-moe-stdlib")


def prompts(tokenizer, batch: int, length: int, seed: int) -> torch.Tensor:
    """``batch`` prompts of ``length`` tokens from standard-library files (sorted, then every
    ``k``-th from ``seed``: the same files on every machine with this Python)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    rows: list[list[int]] = []
    for path in files[seed % 7 :: 7]:
        with open(path, encoding="utf-8", errors="replace") as f:
            ids = tokenizer(f.read()[:20000]).input_ids
        if len(ids) >= 2 * length:
            rows.append(ids[length : 2 * length])  # past the license header
        if len(rows) == batch:
            break
    if len(rows) < batch:
        raise SystemExit(f"only {len(rows)} standard-library files have {2 * length} tokens")
    return torch.tensor(rows)


class _ComputeOnly(SidaPrefetcher):
    """The SiDA prefetcher with its decode predictions computed (captured in the step) and dropped:
    what the predictor's step costs a decode step, without any effect on the cache."""

    def _submit(self, engine, rows, late=False) -> None:
        return None


class _LateCopies(SidaPrefetcher):
    """The SiDA prefetcher copying a replayed step's own-token predictions too, though they land
    after the step they name (the serving prefetcher only feeds them to the policy): what those
    copies cost."""

    def _submit(self, engine, rows, late=False) -> None:
        super()._submit(engine, rows, late=False)


def _in_flight(n: int, call):
    """``call()`` with ``n`` replays in flight for any step it captures (read at each capture)."""
    from sida_moe import decode_graph

    saved, decode_graph.REPLAYS_IN_FLIGHT = decode_graph.REPLAYS_IN_FLIGHT, n
    try:
        return call()
    finally:
        decode_graph.REPLAYS_IN_FLIGHT = saved


def _on_stream(stream, call):
    """``call()`` on ``stream``, ordered after the current stream's work and before its later work."""
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        result = call()
    current.wait_stream(stream)
    return result


def _now(call):
    return call()


def _agree(a: list[int], b: list[int]) -> int:
    """Leading tokens two greedy continuations share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=BUNDLED, help="checkpoint directory with a trained predictor (default: bundled)")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--experts-impl", default="batched_mm",
                    help="resident model's transformers experts implementation (batched_mm captures in every dtype)")
    ap.add_argument("--reference", action="store_true",
                    help="also compare every system's tokens with transformers' own generate on the checkpoint "
                         "with its eager experts loop (the op-by-op twin of the offloaded kernels)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also the compiled loops (sida_compile=True)")
    ap.add_argument("--dry", action="store_true", help="also sida_dry: the predictor's cost alone")
    ap.add_argument("--policy-only", action="store_true", help="also sida_policy_only: SidaPrefetcher(prefetch=False)")
    ap.add_argument("--late-copies", action="store_true",
                    help="also sida_late_copies: the predictor's replayed predictions copied as well (_LateCopies)")
    ap.add_argument("--fp32-decode", action="store_true",
                    help="also sida_fp32_decode: the predictor's decode steps in float32 (decode_dtype), where "
                         "sida runs them in bfloat16 (the CUDA default)")
    ap.add_argument("--in-flight-variant", type=int, default=None, metavar="N",
                    help="also none_lru_ifN and sida_ifN: the same systems as separate models whose steps are "
                         "captured with decode_graph.REPLAYS_IN_FLIGHT = N (compiled with --compile), timed in "
                         "the same rounds as the rest")
    ap.add_argument("--priority-variant", action="store_true",
                    help="also none_lru_hi and sida_hi: none_lru and sida built and run on a high-priority stream "
                         "(compiled with --compile), timed in the same rounds")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    resident = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    resident.set_experts_implementation(args.experts_impl)
    reference = None
    if args.reference:
        reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
        reference.set_experts_implementation("eager")
    none = from_pretrained(args.model, args.budget, args.dtype, device, "lru", "none")
    sida = from_pretrained(args.model, args.budget, args.dtype, device, "predictive", load_prefetcher(args.model))
    engines = {"none_lru": sida_moe.engine_of(none), "sida": sida_moe.engine_of(sida)}
    dry = policy_only = None
    if args.dry:
        dry = from_pretrained(args.model, args.budget, args.dtype, device, "lru", _ComputeOnly(HashPredictor.load(args.model)))
        engines["sida_dry"] = sida_moe.engine_of(dry)
    if args.policy_only:
        policy_only = from_pretrained(args.model, args.budget, args.dtype, device, "predictive",
                                      load_prefetcher(args.model, prefetch=False))
        engines["sida_policy_only"] = sida_moe.engine_of(policy_only)
    late = None
    if args.late_copies:
        late = from_pretrained(args.model, args.budget, args.dtype, device, "predictive",
                               _LateCopies(HashPredictor.load(args.model)))
        engines["sida_late_copies"] = sida_moe.engine_of(late)
    fp32_decode = None
    if args.fp32_decode:
        fp32_decode = from_pretrained(args.model, args.budget, args.dtype, device, "predictive",
                                      load_prefetcher(args.model, decode_dtype=torch.float32))
        engines["sida_fp32_decode"] = sida_moe.engine_of(fp32_decode)
    variants = {}  # name -> (model, how its calls run)
    if args.in_flight_variant is not None:
        n_if = args.in_flight_variant
        wrap = functools.partial(_in_flight, n_if)
        variants[f"none_lru_if{n_if}"] = (from_pretrained(args.model, args.budget, args.dtype, device, "lru", "none"), wrap)
        variants[f"sida_if{n_if}"] = (from_pretrained(args.model, args.budget, args.dtype, device, "predictive",
                                                      load_prefetcher(args.model)), wrap)
    if args.priority_variant:
        # built on the stream too: the engine's expert table names the stream it is read on
        hi = torch.cuda.Stream(device, priority=-1)
        wrap = functools.partial(_on_stream, hi)
        variants["none_lru_hi"] = (wrap(lambda: from_pretrained(args.model, args.budget, args.dtype, device, "lru",
                                                                "none")), wrap)
        variants["sida_hi"] = (wrap(lambda: from_pretrained(args.model, args.budget, args.dtype, device, "predictive",
                                                            load_prefetcher(args.model))), wrap)
    engines.update({name: sida_moe.engine_of(m) for name, (m, _) in variants.items()})
    report: dict = {"args": vars(args), "device": torch.cuda.get_device_name(device),
                    "engine": engines["sida"].describe(), "rows": {}}
    print(report["engine"], flush=True)
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = prompts(tokenizer, batch, args.prompt_len, seed=batch).to(device)
        models = {"resident_graphed": resident}
        systems = {"resident_graphed": lambda n, ids=ids: static_generate(resident, ids, n, graphs=True)}
        if args.compile:
            models["resident_compiled"] = resident
            systems["resident_compiled"] = lambda n, ids=ids: static_generate(resident, ids, n, graphs=True, compile=True)
        offloaded = {k: m for k, m in [("none_lru", none), ("sida", sida), ("sida_dry", dry),
                                       ("sida_policy_only", policy_only), ("sida_late_copies", late),
                                       ("sida_fp32_decode", fp32_decode)]
                     if m is not None}
        loops = {"": {"sida_graphs": True}, **({"_compiled": {"sida_compile": True}} if args.compile else {})}
        for name, model in offloaded.items():
            for suffix, flags in loops.items():
                models[name + suffix] = model
                # EOS off: every timed call makes its N tokens (the loop stops once every row has finished)
                systems[name + suffix] = lambda n, ids=ids, model=model, flags=flags: model.generate(
                    ids, max_new_tokens=n, do_sample=False, eos_token_id=None, **flags)
        for name, (model, wrap) in variants.items():
            models[name] = model
            systems[name] = lambda n, ids=ids, model=model, wrap=wrap: wrap(lambda: model.generate(
                ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                **({"sida_compile": True} if args.compile else {"sida_graphs": True})))
        n = args.new_tokens
        want = None
        if reference is not None:
            with torch.inference_mode():
                want = reference.generate(ids, max_new_tokens=n, do_sample=False,
                                          eos_token_id=None)[:, args.prompt_len :].tolist()
        rows = {name: {"decode_ms": [], "hit_rate": [], "recall": [], "precision": [], "copied": [], "misses": []}
                for name in systems}
        tokens = {}
        for fn in systems.values():  # warm-up: kernels, graph capture, cache contents
            fn(4)
            fn(n)
        for r in range(args.rounds):
            for name in (list(systems) if r % 2 == 0 else list(reversed(systems))):
                engine = engines.get(name.removesuffix("_compiled"))
                if engine is not None:
                    engine.reset_stats()
                w1, _, _, _, _ = timed(lambda: systems[name](1), device)
                s1 = engine.stats() if engine is not None else None
                wn, _, _, out, _ = timed(lambda: systems[name](n), device)
                row = rows[name]
                row["decode_ms"].append((wn - w1) * 1e3 / (n - 1))
                tokens[name] = out[:, args.prompt_len :].tolist()
                if engine is not None:
                    s = engine.stats()
                    d = {k: s[k] - s1[k] for k in ("hits", "misses", "bytes_copied", "predicted_hits",
                                                   "predicted_needed", "predicted_experts")}
                    row["hit_rate"].append(d["hits"] / max(d["hits"] + d["misses"], 1))
                    row["misses"].append(d["misses"] / (n - 1))
                    row["copied"].append(d["bytes_copied"] / (n - 1))
                    if d["predicted_needed"]:
                        row["recall"].append(d["predicted_hits"] / d["predicted_needed"])
                        row["precision"].append(d["predicted_hits"] / d["predicted_experts"])
            print(f"[bs{batch}] round {r}: " + ", ".join(f"{k} {v['decode_ms'][-1]:.3f} ms" for k, v in rows.items()),
                  flush=True)
        out: dict = {}
        for name, row in rows.items():
            d = summary(row["decode_ms"])
            out[name] = {"decode_ms_per_token": d,
                         "decode_tokens_per_s": {k: (1e3 * batch / v if k != "n" else v) for k, v in d.items()},
                         "same_tokens_as_resident": tokens[name] == tokens["resident_graphed"],
                         "tokens_equal_to_resident_per_row": [_agree(a, b) for a, b in zip(tokens[name], tokens["resident_graphed"])],
                         "same_tokens_as_none_lru": tokens[name] == tokens["none_lru"],
                         "same_tokens_as_reference": None if want is None else tokens[name] == want,
                         "tokens_equal_to_reference_per_row": None if want is None else
                         [_agree(a, b) for a, b in zip(tokens[name], want)],
                         # a variant's probe runs the way its calls do (its stream, its replays in flight)
                         "host_enqueue_ms_per_step": (variants[name][1] if name in variants else _now)(lambda: enqueue_ms(
                             models[name], batch, compiled=name.endswith("_compiled") or (name in variants and args.compile)))}
            for key in ("hit_rate", "recall", "precision", "misses", "copied"):
                if row[key]:
                    out[name][{"misses": "misses_per_token", "copied": "copied_bytes_per_token"}.get(key, key)] = summary(row[key])
        speed = {k: out[k]["decode_tokens_per_s"]["median"] for k in out}
        out["sida_over_none"] = speed["sida"] / speed["none_lru"]
        if args.compile:
            out["sida_over_none_compiled"] = speed["sida_compiled"] / speed["none_lru_compiled"]
        if args.in_flight_variant is not None:
            n_if = args.in_flight_variant
            out[f"sida_over_none_if{n_if}"] = speed[f"sida_if{n_if}"] / speed[f"none_lru_if{n_if}"]
        if args.priority_variant:
            out["sida_over_none_hi"] = speed["sida_hi"] / speed["none_lru_hi"]
        report["rows"][f"bs{batch}_{args.budget}"] = out
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        for name in systems:
            o = out[name]
            extra = "".join(f", {k} {o[k]['median']:.3f}" for k in ("hit_rate", "recall", "precision") if k in o)
            print(f"[bs{batch} {args.budget}] {name}: {o['decode_tokens_per_s']['median']:.1f} tok/s "
                  f"({o['decode_tokens_per_s']['min']:.1f}-{o['decode_tokens_per_s']['max']:.1f}){extra}, "
                  f"same tokens as resident {o['same_tokens_as_resident']} (equal prefix per row "
                  f"{o['tokens_equal_to_resident_per_row']}), as none_lru {o['same_tokens_as_none_lru']}, as the eager "
                  f"reference {o['same_tokens_as_reference']} {o['tokens_equal_to_reference_per_row']}", flush=True)
        print(f"[bs{batch} {args.budget}] sida / none_lru: {out['sida_over_none']:.3f}x"
              + (f", compiled {out['sida_over_none_compiled']:.3f}x" if args.compile else "")
              + "".join(f", {k.removeprefix('sida_over_none_')} {v:.3f}x" for k, v in out.items()
                        if k.startswith(("sida_over_none_if", "sida_over_none_hi"))), flush=True)


if __name__ == "__main__":
    main()
