"""Profile a few greedy decode steps of the Qwen3-30B-A3B-shaped preset offloaded at a 100% and a
25% expert budget (same process, each after a warm-up): wall time of 12 tokens and the profiler's
top ops by CUDA and by CPU time. Writes prof.json and prof_<budget>.txt under $OUT.

    OUT=dir python benches/profile_budgets.py
"""
import json, sys, time, os, torch
import sida_moe
from sida_moe.preset_models import build_model
from sida_moe.byte_tokenizer import ByteTokenizer
from torch.profiler import profile, ProfilerActivity
out = os.environ["OUT"]
dev = torch.device("cuda")
model = build_model("qwen3-30b-a3b", dev, torch.bfloat16, seed=0)
batch = {k: v.to(dev) for k, v in ByteTokenizer()(["Mixture-of-Experts models route every token to a few experts"]).items()}
model = sida_moe.offload(model, gpu_budget=1.0, policy="lru", prefetch="none", progress=False)
engine = model.sida_engine
res = {}
for budget in (1.0, 0.25):
    if budget != 1.0:
        engine.reopen_cache(engine.slots_for(budget), "lru")
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        res[f"gen12_s_{budget}"] = time.perf_counter() - t
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
    tab_cuda = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    tab_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60)
    with open(f"{out}/prof_{budget}.txt", "w") as f:
        f.write(tab_cuda + "\n\n" + tab_cpu)
    print(budget, res, flush=True)
    print(tab_cuda[:6000], flush=True)
json.dump(res, open(f"{out}/prof.json", "w"))
