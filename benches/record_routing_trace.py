"""Record a trained model's routing on held-out text as a compact trace for routing replay.

Input: a checkpoint written by ``train_reference_model.py`` (its ``split.json`` names the corpus
and the held-out files). The held-out files are tokenized in order (end-of-text between files),
cut into sequences of ``--seq-len`` tokens, and the first ``--tokens`` worth are run through the
model teacher-forced: under causal attention a token's routing is then what incremental decode
of that text would give, on real text (a small model's own greedy output soon repeats itself,
which would overstate locality). The top-k ids each MoE layer used come from
``sida_moe.train.traces.record_traces`` (what ``sida-moe trace`` runs), recorded into a
temporary directory and repacked as ``sida_moe.bench.replay``'s ``.npz`` format: uint8 ``[tokens,
layers, k]`` plus metadata (model, text, and per layer how often a token reuses the previous
token's experts, against ``k / E`` for uniform routing).

On the GPU machine, train the 128-experts top-8 model and record its trace in one go (about 3
minutes: tokenizer ~5 s, training 150 s, held-out loss, save and recording a few seconds; the
trace is ~1 MB):

    python3 benches/train_reference_model.py --out /tmp/ref-moe-128x8 --experts 128 --top-k 8 \\
        --expert-size 192 --seconds 150 2>&1 | tail -8 && \\
    python3 benches/record_routing_trace.py --model /tmp/ref-moe-128x8 \\
        --out "$OUT/qwen3moe_128x8_stdlib_routing.npz" && cp /tmp/ref-moe-128x8/split.json "$OUT/"

then commit it as ``benches/data/qwen3moe_128x8_stdlib_routing.npz``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor_common import import_predictor_package  # noqa: E402

import_predictor_package()

from sida_moe.train.traces import record_traces  # noqa: E402
from sida_moe.train.trace_loading import load_traces  # noqa: E402

from sida_moe.bench import replay as routing_replay  # noqa: E402
import train_reference_model as ref  # noqa: E402


def held_out_docs(model_dir: str) -> tuple[list[tuple[str, str]], dict]:
    """The held-out files ``split.json`` names, read from its corpus directory."""
    path = os.path.join(model_dir, "split.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: missing (the checkpoint must come from benches/train_reference_model.py)")
    with open(path, encoding="utf-8") as f:
        split = json.load(f)
    root, files = split.get("corpus"), split.get("held_out_files")
    if not isinstance(root, str) or not isinstance(files, list) or not files:
        raise SystemExit(f"{path}: needs 'corpus' (a directory) and a non-empty 'held_out_files' list")
    docs = []
    for rel in files:
        full = os.path.join(root, rel)
        if not os.path.isfile(full):
            raise SystemExit(f"{path}: held-out file {full} is missing on this machine")
        with open(full, encoding="utf-8", errors="replace") as f:
            docs.append((rel, f.read()))
    return docs, split


def reuse_of_previous_token(ids: np.ndarray, seq_len: int) -> list[float]:
    """Per layer: the mean share of a token's k experts that the previous token of its sequence
    also used (uniform random routing: k / E)."""
    tokens, layers, k = ids.shape
    x = ids.reshape(-1, seq_len, layers, k)
    prev, cur = x[:, :-1], x[:, 1:]
    same = (cur[..., :, None] == prev[..., None, :]).any(-1)  # [n, S-1, L, k]
    return [round(float(v), 4) for v in same.mean(axis=(0, 1, 3))]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory of train_reference_model.py")
    ap.add_argument("--out", required=True, help="trace file to write (.npz)")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens to record (rounded down to whole sequences)")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the training sequence length (split.json)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    docs, split = held_out_docs(args.model)
    seq_len = args.seq_len or int(split.get("seq_len", 512))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sequences = ref.tokenize(tokenizer, docs, seq_len)
    rows = args.tokens // seq_len
    if rows < 1 or rows > sequences.shape[0]:
        raise SystemExit(f"--tokens {args.tokens}: the held-out text holds {sequences.shape[0]} sequences of {seq_len} "
                         f"tokens; ask for 1 to {sequences.shape[0]} of them")
    sequences = sequences[:rows]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = record_traces(model, sequences, tmp, batch_size=args.batch_size, top_t=1, next_layer_gate=False,
                                 progress=False, model_name_or_path=os.path.abspath(args.model))
        topk = load_traces(tmp, compact=True).topk_ids  # [L, N, S, k] int16
    ids = topk.permute(1, 2, 0, 3).reshape(rows * seq_len, manifest["num_moe_layers"], manifest["top_k"]).numpy()
    cfg = model.config
    meta = routing_replay.save_routing_trace(args.out, ids, {
        "num_experts": manifest["num_experts"],
        "seq_len": seq_len,
        "source": {
            "model": os.path.basename(os.path.abspath(args.model)),
            "model_type": manifest["model_type"],
            "hidden_size": cfg.hidden_size,
            "moe_intermediate_size": getattr(cfg, "moe_intermediate_size", None),
            "moe_layer_ids": manifest["moe_layer_ids"],
            "train_steps": split.get("steps"),
            "held_out_loss": split.get("held_out_loss"),
            "text": f"held-out files of {split['corpus']} (split.json), in order, teacher-forced",
            "text_files": [p for p, _ in docs],
            "dtype": str(dtype).removeprefix("torch."),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "reuse_of_previous_token": reuse_of_previous_token(ids, seq_len),
        "uniform_reuse": manifest["top_k"] / manifest["num_experts"],
    })
    print(f"wrote {args.out}: {meta['tokens']} tokens x {meta['layers']} layers x top-{meta['top_k']} of "
          f"{meta['num_experts']} experts ({os.path.getsize(args.out) / 1e6:.2f} MB) in {time.perf_counter() - t0:.0f} s; "
          f"previous-token reuse per layer {meta['reuse_of_previous_token']} (uniform {meta['uniform_reuse']:.3f})", flush=True)
    return meta


if __name__ == "__main__":
    main()
