"""Where the host time of a replayed decode step goes, with and without SiDA's predictor.

Builds ``none_lru`` and ``sida`` (``from_pretrained`` at ``--budget``, as ``sida_decode.py``) of a
trained checkpoint, captures their decode steps through ``model.generate`` (eager and compiled),
then replays each ``--steps`` times back to back (``replay_probes.replay_back_to_back``) with
timers around the functions a replay's hand-over calls. Reports inclusive host ms per step of
each (nested ones are inside their callers: ``SideStep.launch`` holds ``set_inputs`` and the
predictor's ``CUDAGraph.replay``), the wall ms per step and the whole replay's host ms with the
device idle before it (``replay_probes.replay_host_seconds``).

    python benches/hand_over_host.py --model /tmp/ref-moe-8x32 --out hand_over_host.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from sida_decode import prompts  # noqa: E402

from sida_moe.bench import replay_probes  # noqa: E402
from sida_moe.engine import OffloadEngine  # noqa: E402
from sida_moe.offloading import from_pretrained  # noqa: E402
from sida_moe.predictor import SidaPrefetcher, load_prefetcher  # noqa: E402
from sida_moe.predictor.graphed import GraphedDecoder  # noqa: E402
from sida_moe.predictor.side_step import SideStep  # noqa: E402

# (owner, attribute name) of every function timed
TIMED = [
    (OffloadEngine, "end_replayed_forward"),
    (OffloadEngine, "end_forward"),
    (OffloadEngine, "prefetch_deferred"),
    (SidaPrefetcher, "hand_over_ahead"),
    (SidaPrefetcher, "_submit"),
    (SideStep, "launch"),
    (GraphedDecoder, "set_inputs"),
    (GraphedDecoder, "replay"),
    (torch.cuda.CUDAGraph, "replay"),
    (torch.cuda.Event, "synchronize"),
    (torch.cuda.Event, "record"),
]


class Timers:
    """Inclusive perf_counter seconds and calls per timed function, while ``on``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self.on = False

    def install(self) -> None:
        for owner, attr in TIMED:
            original = getattr(owner, attr)
            name = f"{owner.__name__}.{attr}"

            @functools.wraps(original)
            def timed(*a, _original=original, _name=name, **k):
                if not self.on:
                    return _original(*a, **k)
                t0 = time.perf_counter()
                try:
                    return _original(*a, **k)
                finally:
                    self.seconds[_name] += time.perf_counter() - t0
                    self.calls[_name] += 1

            setattr(owner, attr, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory with a trained predictor")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    device = torch.device("cuda")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    models = {"none_lru": from_pretrained(args.model, args.budget, args.dtype, device, "lru", "none"),
              "sida": from_pretrained(args.model, args.budget, args.dtype, device, "predictive",
                                      load_prefetcher(args.model))}
    timers = Timers()
    timers.install()
    report: dict = {"args": vars(args), "device": torch.cuda.get_device_name(device), "rows": {}}
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = prompts(tokenizer, batch, args.prompt_len, seed=batch).to(device)
        for name, model in models.items():
            for compiled in (False, True):
                flags = {"sida_compile": True} if compiled else {"sida_graphs": True}
                for _ in range(2):  # capture, then a call on the kept step
                    model.generate(ids, max_new_tokens=args.steps + 8, do_sample=False, eos_token_id=None, **flags)
                timers.reset()
                timers.on = True
                wall = replay_probes.replay_back_to_back(model, batch, steps=args.steps, compiled=compiled)
                timers.on = False
                per_step = {k: 1e3 * v / args.steps for k, v in sorted(timers.seconds.items(), key=lambda kv: -kv[1])}
                calls = {k: v / args.steps for k, v in timers.calls.items()}
                idle = replay_probes.replay_host_seconds(model, batch, compiled=compiled)
                key = f"bs{batch}_{name}{'_compiled' if compiled else ''}"
                report["rows"][key] = {"wall_ms_per_step": 1e3 * wall, "host_ms_per_replay_device_idle": 1e3 * idle,
                                       "inclusive_host_ms_per_step": per_step, "calls_per_step": calls}
                print(f"[{key}] wall {1e3 * wall:.3f} ms/step, one replay's host time (device idle) {1e3 * idle:.3f} ms; "
                      + ", ".join(f"{k} {v:.3f}" for k, v in per_step.items()), flush=True)
                with open(args.out, "w") as f:
                    json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
