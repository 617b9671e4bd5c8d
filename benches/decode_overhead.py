"""Where a small MoE model's decode step goes: ``model.generate`` tokens/s (batch 1) of the
reference-model shape (benches/train_reference_model.py: Qwen3-MoE, 8 layers, 32 experts top-4,
random weights) with each transformers experts implementation and offloaded by sida-moe, plus the
profiler's top CPU-time ops of a few grouped_mm decode steps. JSON to --out.

    python benches/decode_overhead.py --out decode_overhead.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

import sida_moe  # the installed wheel, before train_reference_model adds the source tree to sys.path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def decode_rate(model, ids: torch.Tensor, new_tokens: int) -> dict:
    """Decode tokens/s of ``generate`` (greedy, batch 1, after a warm-up), timed as the bench does:
    (t(N new tokens) - t(1)) / (N - 1)."""
    from sida_moe.bench.timing import DecodeTiming, two_calls

    def generate(n: int):
        with torch.inference_mode():
            return model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)

    generate(new_tokens)
    s = DecodeTiming(1, ids.shape[1], new_tokens, [two_calls(generate, new_tokens, ids.device)]).summary()
    return {k: s[k] for k in ("decode_tokens_per_s", "decode_ms_per_step", "ttft_ms")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    import train_reference_model as ref

    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = ref.build_model(8192, 0).to(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32).eval()
    model.config.output_router_logits = False
    ids = torch.randint(1, 8192, (1, 64), device=dev)
    res: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    import transformers

    res["transformers"] = transformers.__version__
    for impl in (("grouped_mm", "batched_mm") if dev.type == "cuda" else ()) + ("eager",):
        try:
            model.set_experts_implementation(impl)
            res[impl] = decode_rate(model, ids, args.new_tokens)
        except Exception as e:  # noqa: BLE001 - record and go on
            res[impl] = {"error": f"{type(e).__name__}: {e}"}
        print(impl, res[impl], flush=True)
    model.set_experts_implementation("grouped_mm" if dev.type == "cuda" else "eager")
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof, torch.inference_mode():
        model.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    res["grouped_mm_profile_top_cpu"] = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    print(res["grouped_mm_profile_top_cpu"], flush=True)
    for budget in (1.0, 0.25):
        off = sida_moe.offload(copy.deepcopy(model), gpu_budget=budget, prefetch="none", progress=False)
        t = time.perf_counter()
        res[f"sida_{budget}"] = decode_rate(off, ids, args.new_tokens)
        res[f"sida_{budget}"]["seconds"] = time.perf_counter() - t
        print(budget, res[f"sida_{budget}"], flush=True)
        off.sida_engine.close()
        del off
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
