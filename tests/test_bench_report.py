"""The benchmark's timing and report pieces, on real (tiny) generations and real plots."""

import json
import random

import numpy as np
import pytest
import torch

from sida_moe.bench.report import markdown_table, plot_timeline, plot_vs_budget, write_json
from sida_moe.bench.timing import TokenTimer, percentile


def test_percentile_matches_numpy():
    rng = random.Random(0)
    xs = [rng.random() for _ in range(101)]
    for q in (0, 1, 50, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert np.isnan(percentile([], 50))


def _tiny_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(cfg).eval()


def test_token_timer_counts_every_generated_token(monkeypatch):
    """One stamp per generated token (none for the prompt), and the summary's figures from those
    stamps. The timer's clock is a fake one, so the figures are exact; real timings are the
    benchmark's (``sida-moe bench``)."""
    import sida_moe.bench.timing as timing_mod

    ticks = iter([10.0, 10.5, 10.6, 10.7, 10.9, 11.0, 11.4])  # begin, then one per generated token

    class FakeTime:
        @staticmethod
        def perf_counter() -> float:
            return next(ticks)

    monkeypatch.setattr(timing_mod, "time", FakeTime)
    model = _tiny_moe()
    timer = TokenTimer()
    ids = torch.randint(0, 64, (2, 5))
    timer.begin()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, streamer=timer)
    res = timer.result(batch_size=2, prompt_tokens=5)
    assert out.shape[1] - 5 == res.new_tokens == 6
    assert next(ticks, None) is None  # the clock was read once per token, plus begin
    assert res.ttft_s == pytest.approx(0.5)
    assert res.token_latencies_s == pytest.approx([0.1, 0.1, 0.2, 0.1, 0.4])
    s = res.summary()
    assert s["ttft_ms"] == pytest.approx(500.0) and s["prefill_tokens_per_s"] == pytest.approx(2 * 5 / 0.5)
    assert s["decode_tokens_per_s"] == pytest.approx(2 * 5 / 0.9)
    assert s["p50_token_ms"] == pytest.approx(100.0) and s["p99_token_ms"] == pytest.approx(200.0 + 200.0 * 0.96)


def test_token_timer_without_tokens_raises():
    with pytest.raises(RuntimeError, match="no token"):
        TokenTimer().result(1, 1)


def test_report_outputs(tmp_path):
    rows = [
        {"system": "resident", "policy": "-", "predictor": "-", "budget_fraction": None, "batch_size": 1,
         "decode_tokens_per_s": 50.0, "peak_gpu_gib": 10.0},
    ]
    for pol in ("lru", "predictive"):
        for b in (0.1, 0.25, 0.5):
            rows.append({"system": "sida", "policy": pol, "predictor": "gate", "budget_fraction": b, "batch_size": 1,
                         "decode_tokens_per_s": 10 + 40 * b, "hit_rate": 0.5 + b / 2, "peak_gpu_gib": 2 + 8 * b})
    md = markdown_table(rows)
    assert md.count("\n") == len(rows) + 2
    assert "| resident |" in md and "25%" in md and "hit rate" in md
    assert plot_vs_budget(rows, "decode_tokens_per_s", "tok/s", tmp_path / "tps.png")
    assert (tmp_path / "tps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_vs_budget(rows, "missing_metric", "x", tmp_path / "none.png")
    events = [{"lane": "copy", "start_ms": 0.0, "dur_ms": 1.0}, {"lane": "compute", "start_ms": 0.5, "dur_ms": 2.0}]
    assert plot_timeline(events, tmp_path / "tl.png") and (tmp_path / "tl.png").stat().st_size > 1000
    write_json(tmp_path / "r.json", {"machine": "cpu"}, rows)
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["meta"]["machine"] == "cpu" and len(back["results"]) == len(rows)
