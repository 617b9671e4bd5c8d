"""How much a decode prediction adds to what the cache already knows when its copies land.

In the graphed loop the SiDA predictor predicts token t+1's experts at the end of step t; the
host launches step t+1 at once, so the copies the prediction asks for land for step t+2 at the
earliest, when step t+1's own routing is known too. This measures, per MoE layer and token, over
held-out text teacher-forced through a checkpoint and its trained predictor (CPU is enough).

``predictor_common.horizon_shares`` says what each share is: ``beyond_last_step`` is what the
prediction adds once its copies land, ``own_beyond_last_step`` the same for a prediction of
t+2 itself (token t+2 known: an upper bound for a predictor looking one token further).

    python benches/prediction_horizon.py                      # the bundled checkpoint
    python benches/prediction_horizon.py --model /path/ckpt --files 16 --out horizon.json
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import sysconfig

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor_common import emit_report, horizon_shares  # noqa: E402

from sida_moe.predictor import HashPredictor  # noqa: E402
from sida_moe.presets import bundled_model_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=bundled_model_path(), help="checkpoint with a trained predictor")
    ap.add_argument("--files", type=int, default=8, help="held-out standard-library files")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per file (past its first 100)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    predictor = HashPredictor.load(args.model).eval()
    k = model.config.num_experts_per_tok
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[5::13]
    routed, predicted = [], []  # per file: [L, 1, S, k]
    for path in files:
        if len(routed) == args.files:
            break
        with open(path, encoding="utf-8", errors="replace") as f:
            ids = tokenizer(f.read()[:40000]).input_ids[100 : 100 + args.tokens]
        if len(ids) < args.tokens:
            continue
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = model(x, output_router_logits=True).router_logits  # per layer [S, E]
            routed.append(torch.stack([r.topk(k, dim=-1).indices for r in out])[:, None])
            logits, _ = predictor(model.get_input_embeddings()(x).float(), None, None)  # [L, 1, S, E]
            predicted.append(logits.topk(k, dim=-1).indices)
    if not routed:
        raise SystemExit(f"no standard-library file has {args.tokens + 100} tokens")
    report = {"model": args.model, "files": len(routed), "tokens_per_file": args.tokens,
              **horizon_shares(torch.cat(routed, dim=1), torch.cat(predicted, dim=1), model.config.num_experts)}
    emit_report(report, args.out)


if __name__ == "__main__":
    main()
