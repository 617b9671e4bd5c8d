"""Device time of one decode step of the SiDA predictor as the greedy loop runs it: the
``GraphedDecoder`` step captured in its own CUDA graph (the side step the loop launches beside the
next decode step, ``sida_moe.predictor.side_step``), of the eager and of the compiled step
(``capture(compiled=True)``), replayed back to back and timed with CUDA events, for a few network
sizes and dtypes.

Random weights (the cost does not depend on them); a prompt of ``--prompt`` tokens loaded first,
so attention covers a realistic context. JSON (ms per step per variant) to stdout and ``--out``.

    python benches/predictor_device_time.py --out h200_predictor_device_time.json
    python benches/predictor_device_time.py --device cpu --steps 3     # smoke run: no graphs, no timing meaning
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor_common import emit_report, import_predictor_package  # noqa: E402

import_predictor_package()

from sida_moe.predictor.graphed import GraphedDecoder  # noqa: E402
from sida_moe.predictor.model import HashPredictor  # noqa: E402
from sida_moe.predictor.config import PredictorConfig  # noqa: E402

REFERENCE = dict(input_dim=512, num_moe_layers=8, num_experts=32, top_k=4, hidden=512, head_hidden=256, attn_blocks=2)
VARIANTS = {
    "reference (hidden 512, heads 256, 2 blocks)": {},
    "no attention blocks": {"attn_blocks": 0},
    "linear heads, no blocks (the paper's)": {"attn_blocks": 0, "head_hidden": 0},
    "hidden 256, heads 128, 2 blocks": {"hidden": 256, "head_hidden": 128},
    "hidden 128, heads 64, 2 blocks": {"hidden": 128, "head_hidden": 64},
}


def step_ms(cfg: PredictorConfig, dtype: torch.dtype, device: torch.device, compiled: bool, batch: int,
            prompt: int, steps: int) -> float:
    """Milliseconds per replayed step (CPU: per eager step, a smoke value)."""
    torch.manual_seed(0)
    pred = HashPredictor(cfg).to(device=device, dtype=dtype).eval()
    decoder = GraphedDecoder(pred, batch, max_len=prompt + 8 * steps + 64, use_graph=device.type == "cuda")
    x = torch.randn(batch, prompt + 1, cfg.input_dim, device=device, dtype=dtype)
    with torch.inference_mode():
        _, state = pred(x[:, :prompt])
        decoder.load(state)
        static = x[:, prompt:].clone()
        for _ in range(3):  # compiles (compiled) and warms up
            decoder.step(static, compiled=compiled)
        if device.type != "cuda":
            t0 = time.perf_counter()
            for _ in range(steps):
                decoder.step(static, compiled=compiled)
            return (time.perf_counter() - t0) * 1e3 / steps
        decoder.capture(compiled)
        decoder.set_inputs(static)
        for _ in range(3):
            decoder.replay(compiled)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            decoder.replay(compiled)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens loaded before timing")
    ap.add_argument("--steps", type=int, default=100, help="replays timed per variant")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.steps < 1 or args.batch < 1 or args.prompt < 1:
        raise SystemExit("predictor_device_time: --steps, --batch and --prompt must be >= 1")
    device = torch.device(args.device)
    report: dict = {"args": vars(args), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "ms_per_step": {}}
    for name, change in VARIANTS.items():
        cfg = PredictorConfig(**{**REFERENCE, **change})
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            for compiled in (False, True):
                key = f"{name} | {dtype_name} | {'compiled' if compiled else 'eager'}"
                ms = step_ms(cfg, dtype, device, compiled, args.batch, args.prompt, args.steps)
                report["ms_per_step"][key] = ms
                print(f"{key}: {ms:.4f} ms/step ({HashPredictor(cfg).num_parameters() / 1e6:.2f}M parameters)",
                      flush=True)
    emit_report(report, args.out)


if __name__ == "__main__":
    main()
