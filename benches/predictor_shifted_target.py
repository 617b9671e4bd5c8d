"""Can the hash function predict one token further ahead? Train it on each token's own routing
(what the prefetcher serves) and on the next token's (``TrainConfig(target_shift=1)``), for the
same time on the same trace, and compare what each adds, once its copies land, to the last
step's routing (``benches/prediction_horizon.py`` explains the measure) and to an LRU cache.

In the graphed loop a prediction made at the end of step t (input: token t+1) lands for step t+2;
``beyond_last_step`` is the share of step t+2's routed experts the prediction names and step t+1
did not route. The own-routing predictor predicts t+1 there, the shifted one t+2.

Runs on the CPU (a few minutes): the bundled checkpoint, standard-library files split into
training and held-out ones, traces recorded here.

    python benches/predictor_shifted_target.py --seconds 150 --out shifted.json
    python3 benches/predictor_shifted_target.py --model /tmp/ref-moe-8x32 --device cuda --seconds 45 \
        --save-shifted /tmp/ref-moe-8x32-shifted      # then sida_decode.py --model /tmp/ref-moe-8x32-shifted
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections import OrderedDict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor_common import emit_report, horizon_shares  # noqa: E402

from sida_moe.train.traces import chunk_token_ids, record_traces  # noqa: E402
from sida_moe.train.trace_loading import Traces, load_traces  # noqa: E402
from sida_moe.train.evaluation import evaluate  # noqa: E402
from sida_moe.train.configs import TrainConfig  # noqa: E402
from sida_moe.train.predictor_training import train_predictor  # noqa: E402
from sida_moe.presets import bundled_model_path  # noqa: E402


def beyond_last_step(predictor, held: Traces) -> dict:
    """``horizon_shares`` of ``predictor``'s top-k over the held-out trace."""
    with torch.no_grad():
        logits, _ = predictor(held.embeddings[held.input_ids.long()].float())  # [L, N, S, E]
    return horizon_shares(held.topk_ids, logits.topk(held.topk_ids.shape[-1], dim=-1).indices, logits.shape[-1])


def lru_hit_rate(routed: torch.Tensor, prefetched: torch.Tensor | None, capacity: int) -> float:
    """Hit rate of an LRU cache of ``capacity`` experts (all layers) over decode steps:
    ``routed [S, L, k]`` is each step's routing, ``prefetched [S, L, k]`` (or None) the experts
    whose copies land just before each step (inserted as most recent; demand misses too)."""
    cache: OrderedDict = OrderedDict()

    def insert(key) -> None:
        cache[key] = None
        cache.move_to_end(key)
        while len(cache) > capacity:
            cache.popitem(last=False)

    hits = total = 0
    for t in range(routed.shape[0]):
        if prefetched is not None:
            for layer, ids in enumerate(prefetched[t].tolist()):
                for e in ids:
                    if e >= 0:  # -1: no prediction has landed for this step
                        insert((layer, e))
        for layer, ids in enumerate(routed[t].tolist()):
            for e in ids:
                total += 1
                if (layer, e) in cache:
                    hits += 1
                    cache.move_to_end((layer, e))
                else:
                    insert((layer, e))
    return hits / total


def simulated_hits(predictors: dict, held: Traces, budget: float) -> dict:
    """LRU hit rates over the held-out sequences (each decoded from a cold cache), alone and with
    each predictor's copies landing ``lag`` steps after the step they were predicted for: the own-
    routing predictor in time (lag 0, the simulators' assumption) and one step late (lag 1: the
    graphed loop, where a prediction for t+1 lands for t+2), the shifted one at lag 1 (in time for
    the token it predicts)."""
    routed = held.topk_ids.long().permute(1, 2, 0, 3)  # [N, S, L, k]
    L, E, k = held.topk_ids.shape[0], held.manifest["num_experts"], routed.shape[-1]
    capacity = max(1, round(budget * L * E))
    preds = {}
    with torch.no_grad():
        for shift, predictor in predictors.items():
            logits, _ = predictor(held.embeddings[held.input_ids.long()].float())  # [L, N, S, E]
            preds[shift] = logits.topk(k, dim=-1).indices.permute(1, 2, 0, 3)  # [N, S, L, k]
    runs = {"lru": (None, 0), "own_lag0": (0, 0), "own_lag1": (0, 1), "shifted_lag1": (1, 1)}
    out = {}
    for name, (shift, lag) in runs.items():
        rates = []
        for n in range(routed.shape[0]):
            pf = None
            if shift is not None:
                # the prediction at input position j names token j + shift; it lands before step j + lag
                p = preds[shift][n]
                pf = torch.full_like(p, -1)
                pf[lag:] = p[: p.shape[0] - lag]
            rates.append(lru_hit_rate(routed[n], pf, capacity))
        out[name] = sum(rates) / len(rates)
    return {"capacity": capacity, **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=bundled_model_path())
    ap.add_argument("--seconds", type=float, default=150.0, help="training time of each predictor")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--train-sequences", type=int, default=1024)
    ap.add_argument("--held-sequences", type=int, default=128)
    ap.add_argument("--device", default="cpu", help="where the model is traced and the predictors trained")
    ap.add_argument("--save-shifted", default=None, metavar="DIR",
                    help="also write a copy of the checkpoint to DIR with the next-token predictor as its "
                         "predictor (for benches/sida_decode.py --model DIR)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    streams = {"train": [], "held": []}
    for i, path in enumerate(files):
        with open(path, encoding="utf-8", errors="replace") as f:
            streams["held" if i % 10 == 3 else "train"].append(tokenizer(f.read()).input_ids)
    seqs = {name: chunk_token_ids(s, args.seq_len) for name, s in streams.items()}
    seqs = {"train": seqs["train"][: args.train_sequences], "held": seqs["held"][: args.held_sequences]}
    report: dict = {"model": os.path.basename(args.model.rstrip("/")), "seconds": args.seconds,
                    "sequences": {k: int(v.shape[0]) for k, v in seqs.items()}, "seq_len": args.seq_len}
    with tempfile.TemporaryDirectory() as work:
        traces = {}
        for name, ids in seqs.items():
            record_traces(model, ids, os.path.join(work, name), batch_size=32, progress=False, next_layer_gate=False)
            traces[name] = load_traces(os.path.join(work, name))
        predictors = {}
        for shift in (0, 1):
            cfg = TrainConfig(max_seconds=args.seconds, fit_gate=False, fit_temperature=False, seed=0,
                              target_shift=shift, device=args.device)
            predictor, rep = train_predictor(traces["train"], cfg, progress=False)
            predictor = predictor.cpu()
            recall = evaluate(predictor, traces["held"])  # against the routing of the token it predicts
            report[f"shift_{shift}"] = {"steps": rep["steps_run"], "stopped_by": rep["stopped_by"],
                                        "held_out_recall": recall[f"mean_recall@{recall['k']}"],
                                        **beyond_last_step(predictor, traces["held"])}
            predictors[shift] = predictor
            print(shift, json.dumps(report[f"shift_{shift}"]), flush=True)
        for budget in (0.25, 0.5):
            report[f"lru_simulation_{budget:g}"] = simulated_hits(predictors, traces["held"], budget)
            print(budget, json.dumps(report[f"lru_simulation_{budget:g}"]), flush=True)
    if args.save_shifted:
        shutil.copytree(args.model, args.save_shifted, dirs_exist_ok=True)
        predictors[1].save(args.save_shifted)  # replaces the checkpoint's own predictor in the copy
        report["saved_shifted"] = args.save_shifted
    emit_report(report, args.out)


if __name__ == "__main__":
    main()
