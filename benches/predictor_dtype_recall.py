"""What serving the SiDA predictor in a narrower dtype costs in accuracy: held-out recall@k of a
checkpoint's trained predictor run in float32 (how it is served), bfloat16 and float16, on
routing traces recorded here from held-out standard-library files. The device-time side of the
same question is ``benches/predictor_device_time.py`` (bf16 halves the compiled step's time).

    python benches/predictor_dtype_recall.py --out dtype_recall.json              # the bundled checkpoint
    python3 benches/predictor_dtype_recall.py --model /tmp/ref-moe-8x32 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import glob
import os
import sys
import sysconfig
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor_common import emit_report  # noqa: E402

from sida_moe.predictor.model import HashPredictor  # noqa: E402
from sida_moe.train.traces import chunk_token_ids, record_traces  # noqa: E402
from sida_moe.train.trace_loading import load_traces  # noqa: E402
from sida_moe.presets import bundled_model_path  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")


def recall_and_agreement(predictor: HashPredictor, embeds: torch.Tensor, routed: torch.Tensor,
                         reference: torch.Tensor | None) -> tuple[float, float, torch.Tensor]:
    """Recall@k of ``predictor``'s top-k against ``routed [L, N, S, k]`` on ``embeds [N, S, H]``,
    the share of its top-k ids that ``reference`` (another run's ids) also names, and its ids."""
    k = routed.shape[-1]
    with torch.inference_mode():
        logits, _ = predictor(embeds)
    ids = logits.float().topk(k, dim=-1).indices
    hits = (ids.unsqueeze(-1) == routed.unsqueeze(-2)).any(-1).float().mean().item()
    same = 1.0 if reference is None else (ids.unsqueeze(-1) == reference.unsqueeze(-2)).any(-1).float().mean().item()
    return hits, same, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=bundled_model_path(), help="checkpoint directory with its predictor")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--held-sequences", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.seq_len < 2 or args.held_sequences < 1:
        raise SystemExit("predictor_dtype_recall: --seq-len must be >= 2 and --held-sequences >= 1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    predictor = HashPredictor.load(args.model).to(args.device).eval()
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    held = []
    for i, path in enumerate(files):
        if i % 10 == 3:  # the held-out files of benches/predictor_shifted_target.py
            with open(path, encoding="utf-8", errors="replace") as f:
                held.append(tokenizer(f.read()).input_ids)
    ids = chunk_token_ids(held, args.seq_len)[: args.held_sequences]
    with tempfile.TemporaryDirectory() as work:
        record_traces(model, ids, work, batch_size=16, progress=False, next_layer_gate=False)
        traces = load_traces(work)
    embeds = traces.embeddings[traces.input_ids.long()].float().to(args.device)
    routed = traces.topk_ids.long().to(args.device)
    report: dict = {"model": os.path.basename(args.model.rstrip("/")), "device": args.device,
                    "tokens": int(embeds.shape[0] * embeds.shape[1]), "k": int(routed.shape[-1]), "recall": {},
                    "same_ids_as_float32": {}}
    reference = None
    for name in DTYPES:
        dtype = getattr(torch, name)
        run = copy.deepcopy(predictor).to(dtype)
        recall, same, got = recall_and_agreement(run, embeds.to(dtype), routed, reference)
        reference = got if reference is None else reference
        report["recall"][name] = recall
        report["same_ids_as_float32"][name] = same
        print(f"{name}: held-out recall@{routed.shape[-1]} {recall:.4f}, top-k ids shared with float32 {same:.4f}",
              flush=True)
    emit_report(report, args.out)


if __name__ == "__main__":
    main()
