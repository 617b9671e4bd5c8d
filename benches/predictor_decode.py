"""Exact-mode decode with the SiDA predictor vs without, on held-out text (run on the H100).

For an offloaded model at a fixed expert budget, every configuration decodes the same held-out
prompts greedily (batch 1, KV cache); the engine's counters are reset after each prompt's prefill so
the numbers are decode-only:
- cache ``hit_rate`` (acquired experts already resident or arriving),
- ``stall_fraction``: GPU time the compute stream waited on slot-ready events of expert copies still
  in flight (the slot cache's ``stream_wait_seconds``) / decode wall time,
- decode tokens/s, the prefetcher's own metrics (prediction recall and precision over the decode
  tokens),
- whether the tokens equal the all-resident model's (exact mode must not change them).

Used by ``predictor_pipeline.py --decode``; ``run_decode_bench`` takes a loaded model.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch


def greedy_decode(model, prompt: torch.Tensor, new_tokens: int, on_prefilled=None) -> tuple[torch.Tensor, float]:
    """Greedy decode of ``new_tokens`` after ``prompt [1, P]``; returns the tokens and the decode
    seconds (prefill excluded). ``on_prefilled()`` runs between prefill and decode."""
    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    ids = prompt.to(dev)
    mask = torch.ones_like(ids)
    # A created stream, not the legacy default one: its handle is non-zero, which the engine's
    # stall timing (CUDA events around the slot waits) needs.
    stream_ctx = torch.cuda.stream(torch.cuda.Stream(dev)) if dev.type == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), stream_ctx:
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()
        if on_prefilled is not None:
            on_prefilled()
        tokens = [tok]
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            out = model(input_ids=tok, attention_mask=mask, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens.append(tok)
        sync()
    return torch.cat(tokens, dim=1).cpu(), time.perf_counter() - t0


def run_decode_bench(
    model,
    prompts: list[torch.Tensor],
    new_tokens: int,
    budget: float,
    configs: list[dict[str, Any]],
    make_prefetcher,
) -> dict[str, Any]:
    """Offload ``model`` (in place) at ``budget`` and decode ``prompts`` under each config
    ``{"name", "policy", "prefetch"}``; ``make_prefetcher(spec)`` builds the prefetcher."""
    from sida_moe.bench.observers import StallTimer
    from sida_moe.offloading import engine_of, offload

    reference = [greedy_decode(model, p, new_tokens) for p in prompts]
    resident_s = sum(t for _, t in reference)
    results: dict[str, Any] = {
        "budget": budget,
        "prompts": len(prompts),
        "prompt_tokens": int(prompts[0].shape[1]),
        "new_tokens": new_tokens,
        "resident_decode_tokens_per_s": len(prompts) * (new_tokens - 1) / resident_s,
        "configs": {},
    }
    offload(model, gpu_budget=budget, policy="lru", prefetch="none")
    engine = engine_of(model)
    engine.add_observer(StallTimer())  # stall figures in engine.stats() on CUDA
    results["engine"] = engine.describe()
    greedy_decode(model, prompts[0][:, :16], 4)  # warm-up: kernels compiled and selected
    baseline_tokens: list[torch.Tensor] = []
    for cfg in configs:
        engine.reopen_cache(engine.slots_for(budget), cfg["policy"])
        engine.set_prefetcher(make_prefetcher(cfg["prefetch"]))
        totals: dict[str, float] = {"hits": 0.0, "misses": 0.0, "stall_s": 0.0, "decode_s": 0.0, "bytes": 0.0,
                                    "prefetch_issued": 0.0, "prefetch_used": 0.0}
        same_resident = True
        same_baseline = True
        pref_metrics: dict[str, float] = {}
        for i, (prompt, (ref_tokens, _)) in enumerate(zip(prompts, reference)):
            tokens, seconds = greedy_decode(model, prompt, new_tokens, on_prefilled=engine.reset_stats)
            # exact mode: every configuration must give the first one's tokens (same kernels); the
            # all-resident model's bf16 kernels differ in rounding, so greedy paths may part later
            if i >= len(baseline_tokens):
                baseline_tokens.append(tokens)
            same_baseline = same_baseline and torch.equal(tokens, baseline_tokens[i])
            s = engine.stats()
            totals["hits"] += s["hits"]
            totals["misses"] += s["misses"]
            totals["stall_s"] += float(s.get("stream_wait_seconds", s.get("host_stall_seconds", 0.0)))
            totals["decode_s"] += seconds
            totals["bytes"] += s["bytes_copied"]
            totals["prefetch_issued"] += s.get("prefetch_issued", 0.0)
            totals["prefetch_used"] += s.get("prefetch_used", 0.0)
            same_resident = same_resident and torch.equal(tokens, ref_tokens)
            for k, v in s.items():
                if k.startswith("prefetch_") and isinstance(v, float) and k[9:] in (
                    "hit_rate", "precision", "scored_experts"):
                    pref_metrics[k] = pref_metrics.get(k, 0.0) + v / len(prompts)
        lookups = totals["hits"] + totals["misses"]
        n_tok = len(prompts) * (new_tokens - 1)
        results["configs"][cfg["name"]] = {
            "policy": cfg["policy"],
            "prefetch": cfg["prefetch"] if isinstance(cfg["prefetch"], str) else cfg["name"],
            "hit_rate": totals["hits"] / lookups if lookups else 0.0,
            "stall_fraction": totals["stall_s"] / totals["decode_s"],
            "stall_ms_per_token": 1e3 * totals["stall_s"] / n_tok,
            "decode_tokens_per_s": n_tok / totals["decode_s"],
            "pcie_mb_per_token": totals["bytes"] / 1e6 / n_tok,
            "prefetch_precision": totals["prefetch_used"] / totals["prefetch_issued"] if totals["prefetch_issued"] else None,
            "same_tokens_as_first_config": same_baseline,
            "same_tokens_as_resident": same_resident,
            **pref_metrics,
        }
        print(f"  decode {cfg['name']}: {results['configs'][cfg['name']]}", flush=True)
    engine.close()
    return results
