"""Decode-step cost of an offloaded model vs the all-resident original (pytest-benchmark).

One cached decode step (batch 1) of the ``qwen3-moe-tiny`` preset's shape: the original model, the
offloaded one with every expert resident (the engine's own overhead: routing sync, slot table,
acquire/release, kernel dispatch) and at a 25% budget with each prefetcher (plus copies).

    python -m pytest benches/bench_offload_decode.py --benchmark-json=out.json
"""

from __future__ import annotations

import copy

import pytest
import torch

import sida_moe
from sida_moe.presets import build_model

from conftest import cuda, sync


@pytest.fixture(scope="module")
def setup():
    device = torch.device("cuda" if cuda() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model("qwen3-moe-tiny", device, dtype, seed=0)
    prompt = torch.randint(3, 259, (1, 32), device=device)
    return model, prompt, device


def _run(benchmark, model, prompt, rounds: int = 30) -> None:
    """Time one cached decode step after a 32-token prefill; each round gets a fresh copy of the
    prefill's KV cache (copied outside the timing) so every step does the same work."""
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
    prefill_cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def setup_round():
        return (copy.deepcopy(prefill_cache),), {}

    def step(cache):
        with torch.inference_mode():
            model(input_ids=token, past_key_values=cache, use_cache=True)
        sync()

    step(*setup_round()[0])  # warm-up
    if hasattr(model, "sida_engine"):
        model.sida_engine.reset_stats()
    benchmark.pedantic(step, setup=setup_round, rounds=rounds)


def test_decode_all_resident(benchmark, setup):
    model, prompt, _ = setup
    _run(benchmark, model, prompt)


@pytest.mark.parametrize("budget, prefetch", [(1.0, "none"), (0.25, "none"), (0.25, "next_layer_gate")])
def test_decode_offloaded(benchmark, setup, budget, prefetch):
    model, prompt, _ = setup
    offloaded = sida_moe.offload(copy.deepcopy(model), gpu_budget=budget, prefetch=prefetch)
    _run(benchmark, offloaded, prompt)
    stats = offloaded.sida_engine.stats()
    benchmark.extra_info.update(
        hit_rate=stats["hit_rate"], bytes_copied_per_step=stats["bytes_copied"] / max(stats["forwards"], 1),
        prefetch_hit_rate=stats.get("prefetch_hit_rate"),
    )
    offloaded.sida_engine.close()
