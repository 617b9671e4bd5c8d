"""Where a predictor training step spends its time, and how many tokens a second each shape trains.

Held-out recall of the deep predictor grows with the number of training steps (NOTES.md, session 4),
so steps per second decide how good a predictor a fixed training budget buys. This times full
training steps (forward, truncated-KD loss, backward, AdamW) on random trace-shaped batches of the
reference model's size (d=512, 8 MoE layers, 32 experts, top-4; predictor width 512, MLP heads,
2 causal blocks) for several batch x sequence shapes, with and without bf16 autocast, and the
step's parts alone (LSTM, sparsemax attention, the blocks). JSON on stdout and in ``--out``.

    python benches/predictor_train_speed.py --out speed.json              # GPU
    python benches/predictor_train_speed.py --device cpu --steps 2 --small  # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor_common import import_predictor_package  # noqa: E402

import_predictor_package()

from sida_moe.predictor.model import HashPredictor  # noqa: E402
from sida_moe.predictor.config import PredictorConfig  # noqa: E402
from sida_moe.predictor.sparsemax import sparsemax  # noqa: E402
from sida_moe.train.predictor_training import _tf32_matmuls, distillation_loss  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, steps: int, warmup: int = 3) -> float:
    """Seconds per call of ``fn`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def train_step_seconds(cfg: PredictorConfig, batch: int, seq: int, bf16: bool, device: torch.device, steps: int) -> float:
    torch.manual_seed(0)
    model = HashPredictor(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    L, E, k, t = cfg.num_moe_layers, cfg.num_experts, cfg.top_k, min(30, cfg.num_experts)
    embeds = torch.randn(batch, seq, cfg.input_dim, device=device)
    order = torch.rand(L, batch, seq, E, device=device).argsort(-1)
    topk_ids, logit_ids = order[..., :k], order[..., :t]
    logit_vals = torch.randn(L, batch, seq, t, device=device).sort(-1, descending=True).values
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> None:
        with amp:
            logits, _ = model(embeds)
        loss = distillation_loss(logits, topk_ids, logit_ids, logit_vals, 0.5, 30, "topk")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return _timed(step, device, steps)


def part_seconds(cfg: PredictorConfig, batch: int, seq: int, device: torch.device, steps: int) -> dict[str, float]:
    """Forward + backward of each part alone, at the step's shapes."""
    model = HashPredictor(cfg).to(device).train()
    h = cfg.hidden
    x = torch.randn(batch, seq, h, device=device, requires_grad=True)
    scores = torch.randn(batch, seq, seq, device=device, requires_grad=True)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()

    def lstm() -> None:
        model.lstm(x)[0].sum().backward()

    def attention() -> None:
        sparsemax(scores.masked_fill(~causal, -1e9), dim=-1).sum().backward()

    def blocks() -> None:
        y = x
        for block in model.blocks:
            y, _ = block(y, block.empty_past(batch, device, x.dtype), None)
        y.sum().backward()

    return {name: _timed(fn, device, steps) for name, fn in (("lstm", lstm), ("sparsemax_attention", attention), ("blocks", blocks))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--attn-blocks", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke run)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu")
    d, hidden, hh = (64, 64, 32) if args.small else (512, 512, 256)
    cfg = PredictorConfig(input_dim=d, num_moe_layers=8, num_experts=32, top_k=4, hidden=hidden, head_hidden=hh,
                          attn_blocks=args.attn_blocks)
    shapes = [(64, 256), (128, 128), (256, 64), (128, 256), (256, 256)]
    if args.small:
        shapes = [(4, 32), (8, 16)]
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "predictor": cfg.__dict__, "steps": args.steps, "rows": []}
    with _tf32_matmuls(device):
        for batch, seq in shapes:
            for bf16 in (False, True):
                sec = train_step_seconds(cfg, batch, seq, bf16, device, args.steps)
                row = {"batch": batch, "seq": seq, "bf16": bf16, "ms_per_step": 1e3 * sec,
                       "tokens_per_s": batch * seq / sec}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
        batch, seq = shapes[0]
        result["parts_ms"] = {k: 1e3 * v for k, v in part_seconds(cfg, batch, seq, device, args.steps).items()}
        result["parts_shape"] = [batch, seq]
    print(json.dumps(result["parts_ms"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
