"""How many decode replays to queue at once (``sida_moe.decode_graph.REPLAYS_IN_FLIGHT``): decode
time and the inference thread's CPU per step with 1 and 2 queued replays, interleaved in one
process, on an offloaded model with replayed routing (graphed loop through ``model.generate``).

With two queued, the launch of the second replay can wait for room in the launch queue while the
first runs; with one, the device idles for the host's wake-up and launch between steps. The
constant is read when a step is captured, so each setting captures its steps anew (a compiled
model keeps its compiled code: only the CUDA graph is captured again). CPU per step: 32
back-to-back replays of the captured step after each timed pair
(``replay_probes.replay_back_to_back``), so a call's prefill is not in it.

    python benches/replays_in_flight.py --budget 25% --batches 1,8 \
        --routing replay:benches/data/qwen3moe_128x8_stdlib_routing.npz --out rif.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from host_free_decode import parse_routings, set_routing, summary, timed  # noqa: E402

import sida_moe  # noqa: E402
from sida_moe import decode_graph  # noqa: E402
from sida_moe.bench import replay_probes  # noqa: E402
from sida_moe.preset_models import build_offloaded  # noqa: E402

PROBE = 32  # back-to-back replays of the CPU probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--routing", default="model")
    ap.add_argument("--settings", default="2,1", help="comma-separated REPLAYS_IN_FLIGHT values")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="the step under torch.compile first (sida_compile=True)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_offloaded(args.preset, args.budget, device=device, dtype=torch.bfloat16, policy="lru", prefetch="none")
    engine = sida_moe.engine_of(model)
    print(f"built in {time.perf_counter() - t0:.0f} s; {engine.describe()}", flush=True)
    [(label, trace)] = parse_routings(args.routing, args.preset)
    set_routing(label, trace, [model], engine.layers[0].num_experts)
    settings = [int(s) for s in args.settings.split(",")]
    n = args.new_tokens
    report: dict = {"args": vars(args), "device": torch.cuda.get_device_name(device), "rows": {}}
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(3, 1000, (batch, args.prompt_len), device=device,
                            generator=torch.Generator(device).manual_seed(batch))

        def call(k: int):
            return model.generate(ids, max_new_tokens=k, do_sample=False, eos_token_id=None, sida_compile=args.compile)

        rows = {s: {"decode_ms": [], "thread_cpu_ms": [], "process_cpu_ms": [], "hit_rate": []} for s in settings}
        for r in range(args.rounds):
            for s in settings if r % 2 == 0 else list(reversed(settings)):
                torch.cuda.synchronize(device)
                decode_graph.REPLAYS_IN_FLIGHT = s
                model.__dict__.pop("_sida_decode_steps", None)  # the compiled model stays
                call(4)  # capture with this setting
                call(n)
                # decode only: the N-token call's counters less the 1-token call's (prefill)
                engine.reset_stats()
                w1, _, _, _, _ = timed(lambda: call(1), device)
                s1 = engine.stats()
                engine.reset_stats()
                wn, _, _, _, _ = timed(lambda: call(n), device)
                sn = engine.stats()
                hits, misses = sn["hits"] - s1["hits"], sn["misses"] - s1["misses"]
                _, pb, tb, _, _ = timed(lambda: replay_probes.replay_back_to_back(model, batch, PROBE, args.compile), device)
                rows[s]["decode_ms"].append((wn - w1) * 1e3 / (n - 1))
                rows[s]["thread_cpu_ms"].append(tb * 1e3 / PROBE)
                rows[s]["process_cpu_ms"].append(pb * 1e3 / PROBE)
                rows[s]["hit_rate"].append(hits / max(1, hits + misses))
                print(f"[bs{batch}] round {r} in flight {s}: {rows[s]['decode_ms'][-1]:.2f} ms/step, "
                      f"thread CPU {rows[s]['thread_cpu_ms'][-1]:.2f} ms/step, process "
                      f"{rows[s]['process_cpu_ms'][-1]:.2f}", flush=True)
        for s, row in rows.items():
            out = {k: summary(v) for k, v in row.items()}
            report["rows"][f"bs{batch}_in_flight_{s}"] = out
            print(f"[bs{batch}] in flight {s}: {out['decode_ms']['median']:.2f} ms/step "
                  f"({out['decode_ms']['min']:.2f}-{out['decode_ms']['max']:.2f}), inference thread CPU "
                  f"{out['thread_cpu_ms']['median']:.2f} ms/step, process {out['process_cpu_ms']['median']:.2f}, "
                  f"hit rate {out['hit_rate']['median']:.3f}", flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
