"""Host cost of one decode step of the SiDA predictor: eager ``HashPredictor.forward`` vs the
CUDA-graphed ``GraphedDecoder`` (what ``SidaPrefetcher`` runs per decode token: on its own in an
eager loop, inside the captured decode step in the greedy loop).

A random predictor of the reference size (input 512, 8 MoE layers, 32 experts, top-4, hidden 512,
MLP heads 256, 2 causal blocks) prefills a prompt, then decodes the same tokens both ways. Per step:
wall time on the host including a copy of the top-k ids to the host (pinned memory + event wait; the
prefetcher itself hands the ids to the cache's native thread with ``prefetch_deferred`` and does
not wait, so this is an upper bound), and the thread's CPU time (``time.thread_time``) -- the part
that holds the GIL and competes with the model's decode. Prints JSON (and writes it to ``--out``).
A few seconds.

    python benches/predictor_step_cost.py                 # the GPU
    python benches/predictor_step_cost.py --device cpu    # the fixed-shape step without a graph
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

from sida_moe.predictor.graphed import GraphedDecoder  # noqa: E402
from sida_moe.predictor.model import HashPredictor  # noqa: E402
from sida_moe.predictor.config import PredictorConfig  # noqa: E402

REFERENCE = dict(input_dim=512, num_moe_layers=8, num_experts=32, top_k=4, hidden=512, head_hidden=256, attn_blocks=2)


def _to_host(ids: torch.Tensor) -> torch.Tensor:
    """A copy of the top-k ids to the host: pinned memory, then an event wait (GIL released)."""
    if ids.device.type != "cuda":
        return ids
    host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
    host.copy_(ids, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return host


def _timed(step, tokens: torch.Tensor, warmup: int) -> tuple[list[torch.Tensor], float, float]:
    """Runs ``step(x)`` for each token ``[B, 1, D]`` slice; returns its logits and the wall / CPU ms
    per step after the first ``warmup`` steps."""
    out, wall, cpu = [], 0.0, 0.0
    for i in range(tokens.shape[1]):
        t0, c0 = time.perf_counter(), time.thread_time()
        logits = step(tokens[:, i : i + 1])
        t1, c1 = time.perf_counter(), time.thread_time()
        out.append(logits)
        if i >= warmup:
            wall += t1 - t0
            cpu += c1 - c0
    n = max(tokens.shape[1] - warmup, 1)
    return out, 1e3 * wall / n, 1e3 * cpu / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (eager prefill)")
    ap.add_argument("--tokens", type=int, default=None, help="decode tokens each way (default: 200 on a GPU, 60 on the CPU)")
    ap.add_argument("--warmup", type=int, default=20, help="first decode tokens left out of the timing")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=2048, help="GraphedDecoder capacity")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.tokens is None:
        args.tokens = 200 if args.device.startswith("cuda") else 60
    if args.prompt + args.tokens > args.max_len:
        ap.error(f"--prompt + --tokens ({args.prompt + args.tokens}) must fit in --max-len ({args.max_len})")

    device = torch.device(args.device)
    # full fp32, as the eager predictor would compute without TF32: the logits diff below is then a sanity check
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    predictor = HashPredictor(PredictorConfig(**REFERENCE)).to(device).eval()
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(args.batch, args.prompt + args.tokens, REFERENCE["input_dim"], generator=g).to(device)
    prompt, decode = embeds[:, : args.prompt], embeds[:, args.prompt :]
    k = REFERENCE["top_k"]
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # a stream of its own

    with torch.inference_mode(), (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
        _, prefill_state = predictor(prompt)

        state = prefill_state

        def eager_step(x: torch.Tensor) -> torch.Tensor:
            nonlocal state
            logits, state = predictor(x, state)
            _to_host(logits.topk(k, dim=-1).indices)
            return logits

        eager_logits, eager_ms, eager_cpu_ms = _timed(eager_step, decode, args.warmup)

        decoder = GraphedDecoder(predictor, args.batch, args.max_len, k=k)
        t0 = time.perf_counter()
        decoder.capture()
        capture_ms = 1e3 * (time.perf_counter() - t0)
        assert decoder.load(prefill_state)

        def graphed_step(x: torch.Tensor) -> torch.Tensor:
            logits, ids = decoder.step(x)
            kept = logits.clone()  # static outputs: overwritten by the next step
            _to_host(ids)
            return kept

        graphed_logits, graphed_ms, graphed_cpu_ms = _timed(graphed_step, decode, args.warmup)
        diff = max((a - b).abs().max().item() for a, b in zip(eager_logits, graphed_logits))

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "predictor": REFERENCE | {"parameters": predictor.num_parameters()},
        "batch": args.batch,
        "prompt_tokens": args.prompt,
        "decode_tokens": args.tokens,
        "timed_tokens": max(args.tokens - args.warmup, 1),
        "max_len": args.max_len,
        "cuda_graph": decoder.graphed,
        "eager_ms_per_token": round(eager_ms, 4),
        "graphed_ms_per_token": round(graphed_ms, 4),
        "eager_cpu_ms_per_token": round(eager_cpu_ms, 4),
        "graphed_cpu_ms_per_token": round(graphed_cpu_ms, 4),
        "wall_speedup": round(eager_ms / graphed_ms, 2) if graphed_ms else None,
        "cpu_speedup": round(eager_cpu_ms / graphed_cpu_ms, 2) if graphed_cpu_ms else None,
        "capture_ms": round(capture_ms, 2),
        "max_abs_logit_diff": diff,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
