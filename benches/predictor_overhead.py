"""Where the SiDA predictor's decode slowdown comes from (run on the H100; JSON to --out).

Tokens/s of single bench rows vary by up to ~25% run to run, so this script decodes the same
held-out prompts under each configuration in turn, for several rounds in one process (one cache,
reopened per configuration), and reports every round and the median:

- ``none``: no prefetching (the baseline);
- ``sida_dry``: the prefetcher predicts every token (prompt, the decoder's step per decode token)
  but hands nothing to the cache (no ``prefetch_deferred``: no copies, no future, nothing scored):
  its own cost to the decode loop (GIL, GPU);
- ``sida``: the full prefetcher (``SidaPrefetcher``) as the bench runs it.

The loop is ``predictor_decode.greedy_decode``: transformers-style cached forwards (an eager loop,
the prediction runs in ``begin_forward``), not the graphed greedy loop of ``sida_moe.decode_graph``.

    python benches/predictor_overhead.py --model REF --predictor-path P --prompt-file held.txt --out o.json

``--switch-intervals 0.005,0.0005`` repeats every round at each of these ``sys.setswitchinterval``
values (the seconds a thread that wants the GIL waits before the holder is asked to drop it; Python's
default is 0.005, a third of this model's decode step). ``--random-model`` measures on an untrained
model of the reference model's shape with an untrained predictor of the shipped variant (its
per-token cost does not depend on its weights): no reference-model training needed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor_common import import_predictor_package  # noqa: E402

import_predictor_package()

from predictor_decode import greedy_decode  # noqa: E402

from sida_moe.bench.observers import StallTimer

from sida_moe.predictor import HashPredictor, SidaPrefetcher  # noqa: E402


class _NoHandOver:
    """The engine as the prefetcher sees it, minus the hand-over: ``prefetch_deferred`` does
    nothing, everything else is the engine's."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def prefetch_deferred(self, *args, **kwargs) -> None:
        return None

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


class DrySida(SidaPrefetcher):
    """A SiDA prefetcher whose predictions are computed and thrown away (measurement only)."""

    name = "sida_dry"

    def attach(self, engine) -> None:
        super().attach(_NoHandOver(engine))


def make(name: str, predictor: HashPredictor):
    if name == "none":
        return None
    if name == "sida_dry":
        return DrySida(predictor, feed_future=False)
    if name == "sida":
        return SidaPrefetcher(predictor)
    raise SystemExit(f"unknown configuration {name!r}")


CONFIGS = ("none", "sida_dry", "sida")


def run(model, predictor: HashPredictor, prompts: list[torch.Tensor], new_tokens: int, budget: float,
        policy: str, rounds: int, configs=CONFIGS, switch_intervals: tuple[float, ...] = ()) -> dict:
    from sida_moe.offloading import engine_of, offload
    from sida_moe.prefetchers import NoPrefetch

    offload(model, gpu_budget=budget, policy=policy, prefetch="none")
    engine = engine_of(model)
    engine.add_observer(StallTimer())  # stall figures in engine.stats() on CUDA
    greedy_decode(model, prompts[0][:, :16], 4)  # warm-up
    out: dict = {"budget": budget, "policy": policy, "rounds": rounds, "prompts": len(prompts),
                 "new_tokens": new_tokens, "prompt_tokens": int(prompts[0].shape[1]), "engine": engine.describe(),
                 "configs": {name: {"tokens_per_s": [], "hit_rate": [], "stall_fraction": []} for name in configs}}
    intervals = switch_intervals or (sys.getswitchinterval(),)
    default_interval = sys.getswitchinterval()
    labelled = [(name, t, name if not switch_intervals else f"{name}@{t:g}") for t in intervals for name in configs]
    out["configs"] = {label: {"tokens_per_s": [], "hit_rate": [], "stall_fraction": [], "switch_interval": t}
                      for _, t, label in labelled}
    first_tokens: list[torch.Tensor] | None = None
    same = True
    try:
        for r in range(rounds):
            for name, interval, label in labelled:
                sys.setswitchinterval(interval)
                engine.reopen_cache(engine.slots_for(budget), policy)
                pf = make(name, predictor)
                engine.set_prefetcher(pf if pf is not None else NoPrefetch())
                decode_s = stall = hits = lookups = 0.0
                tokens = []
                for prompt in prompts:
                    toks, seconds = greedy_decode(model, prompt, new_tokens, on_prefilled=engine.reset_stats)
                    s = engine.stats()
                    decode_s += seconds
                    stall += float(s.get("stream_wait_seconds", 0.0))
                    hits += s["hits"]
                    lookups += s["hits"] + s["misses"]
                    tokens.append(toks)
                if first_tokens is None:
                    first_tokens = tokens
                same = same and all(torch.equal(a, b) for a, b in zip(tokens, first_tokens))
                row = out["configs"][label]
                row["tokens_per_s"].append(len(prompts) * (new_tokens - 1) / decode_s)
                row["hit_rate"].append(hits / lookups if lookups else 0.0)
                row["stall_fraction"].append(stall / decode_s)
                if pf is not None:
                    m = pf.metrics()  # over the last prompt's decode tokens (reset after its prefill)
                    row.setdefault("prefetch_hit_rate", []).append(m["hit_rate"])
                    row.setdefault("prefetch_precision", []).append(m["precision"])
                print(f"round {r} {label}: {row['tokens_per_s'][-1]:.1f} tok/s, hit {row['hit_rate'][-1]:.3f}, "
                      f"stall {row['stall_fraction'][-1]:.4f}", flush=True)
    finally:
        sys.setswitchinterval(default_interval)
        engine.close()
    for row in out["configs"].values():
        # each configuration against "none" at the same switch interval
        base_label = "none" if not switch_intervals else f"none@{row['switch_interval']:g}"
        base = (statistics.median(out["configs"][base_label]["tokens_per_s"])
                if base_label in out["configs"] else None)
        row["median_tokens_per_s"] = statistics.median(row["tokens_per_s"])
        row["median_hit_rate"] = statistics.median(row["hit_rate"])
        if base:
            row["relative_to_none"] = row["median_tokens_per_s"] / base
    out["all_configs_same_tokens"] = same
    return out


def random_setup(num_prompts: int, prompt_tokens: int, dtype: torch.dtype, device: str):
    """An untrained model of the reference model's shape (``train_reference_model.build_model``), an
    untrained predictor of the shipped variant, and random prompts."""
    from train_reference_model import build_model

    from sida_moe.adapters import decoder_moe_layers
    from sida_moe.predictor import PredictorConfig

    torch.manual_seed(0)
    model = build_model(8192, 0).to(device=device, dtype=dtype).eval()
    layers = decoder_moe_layers(model)
    cfg = PredictorConfig(input_dim=model.config.hidden_size, num_moe_layers=len(layers),
                          num_experts=layers[0].num_experts, top_k=model.config.num_experts_per_tok,
                          hidden=512, head_hidden=256, attn_blocks=2)
    predictor = HashPredictor(cfg)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 8192, (1, prompt_tokens), generator=gen) for _ in range(num_prompts)]
    return model, predictor.eval(), prompts


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--predictor-path")
    ap.add_argument("--prompt-file", help="held-out text the prompts are cut from")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--switch-intervals", default="", help="comma-separated sys.setswitchinterval values (seconds)")
    ap.add_argument("--random-model", action="store_true",
                    help="untrained reference-shaped model and predictor (--model/--predictor-path/--prompt-file unused)")
    args = ap.parse_args(argv)
    intervals = tuple(float(t) for t in filter(None, args.switch_intervals.split(",")))
    if not args.random_model and not (args.model and args.predictor_path and args.prompt_file):
        ap.error("--model, --predictor-path and --prompt-file are required (or --random-model)")
    if any(not t > 0 for t in intervals):
        raise SystemExit(f"--switch-intervals must be positive seconds, got {args.switch_intervals!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.random_model:
        model, predictor, prompts = random_setup(args.prompts, args.prompt_tokens, dtype, device)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
        with open(args.prompt_file) as f:
            ids = tokenizer(f.read(), add_special_tokens=False)["input_ids"]
        step = max(args.prompt_tokens, len(ids) // max(1, args.prompts))
        prompts = [torch.tensor([ids[i * step : i * step + args.prompt_tokens]]) for i in range(args.prompts)]
        predictor = HashPredictor.load(args.predictor_path)
    out = run(model, predictor, prompts, args.new_tokens, args.budget, args.policy, args.rounds,
              tuple(args.configs.split(",")), intervals)
    out["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    out["seconds"] = time.perf_counter() - t0
    out["command"] = "python benches/predictor_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps({n: {k: v for k, v in r.items() if k.startswith(("median", "relative"))}
                      for n, r in out["configs"].items()}, indent=1))
    return out


if __name__ == "__main__":
    main()
