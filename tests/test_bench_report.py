"""The benchmark's timing and report pieces, on real (tiny) generations and real plots."""

import json

import pytest
import torch

from sida_moe.bench import timing
from sida_moe.bench.report import markdown_table, plot_timeline, plot_vs_budget, write_json
from sida_moe.bench.timing import DecodeTiming, interleave, two_calls


class _Clock:
    """perf_counter and process_time that move only when a fake generate says so."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def install(self, monkeypatch):
        monkeypatch.setattr(timing.time, "perf_counter", lambda: self.wall)
        monkeypatch.setattr(timing.time, "process_time", lambda: self.cpu)


def _fake_generate(clock, prefill_s, step_s, cpu_step_s):
    def generate(n):
        clock.wall += prefill_s + (n - 1) * step_s
        clock.cpu += prefill_s + (n - 1) * cpu_step_s
        return n
    return generate


def test_decode_time_per_step_is_the_difference_of_the_two_calls(monkeypatch):
    """(t(N) - t(1)) / (N - 1): prefill cancels; median, min and max over the rounds; tokens/s of
    the whole batch; the CPU time the same way."""
    clock = _Clock()
    clock.install(monkeypatch)
    rounds = []
    for step in (0.010, 0.012, 0.011):  # three rounds of different speed
        rounds.append(two_calls(_fake_generate(clock, 0.5, step, step / 4), 9, None))
    assert rounds[0].full.out == 9 and rounds[0].first.out == 1
    s = DecodeTiming(batch_size=2, prompt_tokens=16, new_tokens=9, rounds=rounds).summary()
    assert s["rounds"] == 3
    assert s["decode_ms_per_step"] == pytest.approx(11.0)
    assert (s["decode_ms_per_step_min"], s["decode_ms_per_step_max"]) == (pytest.approx(10.0), pytest.approx(12.0))
    assert s["decode_ms_per_step_rounds"] == [pytest.approx(10.0), pytest.approx(12.0), pytest.approx(11.0)]
    assert s["decode_tokens_per_s"] == pytest.approx(2 / 0.011)
    assert s["decode_tokens_per_s_min"] == pytest.approx(2 / 0.012) and s["decode_tokens_per_s_max"] == pytest.approx(200.0)
    assert s["decode_spread"] == pytest.approx(2 / 11)
    assert s["ttft_ms"] == pytest.approx(500.0) and s["prefill_tokens_per_s"] == pytest.approx(2 * 16 / 0.5)
    assert s["process_cpu_ms_per_step"] == pytest.approx(11.0 / 4)


def test_two_calls_observe_each_call_and_refuse_one_token(monkeypatch):
    events = []
    rnd = two_calls(lambda n: events.append(("call", n)), 3, None, before=lambda: events.append("reset"),
                    after=lambda: {"seen": len(events)})
    assert events == ["reset", ("call", 1), "reset", ("call", 3)]
    assert rnd.first_seen == {"seen": 2} and rnd.full_seen == {"seen": 4}
    with pytest.raises(ValueError, match="at least 2"):
        two_calls(lambda n: n, 1, None)
    with pytest.raises(RuntimeError, match="no round"):
        DecodeTiming(1, 1, 3, []).summary()


def test_interleaved_rounds_alternate_the_order():
    order = []

    def visit(name):
        def run():
            order.append(name)
            return name
        return run

    got = interleave({"a": visit("a"), "b": visit("b"), "c": visit("c")}, 3)
    assert order == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert got == {"a": ["a"] * 3, "b": ["b"] * 3, "c": ["c"] * 3}


def _tiny_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(cfg).eval()


def test_generate_makes_exactly_the_tokens_asked_for_and_greedy_calls_stay_plain():
    """EOS never ends a timed call early (EOS off), and greedy and sampled calls are ones the
    offloaded model's generate serves from its graphed loop (plain calls)."""
    from sida_moe.bench.inputs import generate_new
    from sida_moe.generate_route import plain_call
    from sida_moe.sampling import SamplingParams

    model = _tiny_moe()
    prompts = {"input_ids": torch.randint(0, 64, (1, 5)), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    first = generate_new(model, prompts, 6)
    model.generation_config.eos_token_id = int(first[0, 0])  # transformers would stop after one token
    for sample in (False, True):
        assert generate_new(model, prompts, 6, sample=sample).shape == (1, 6)
    assert torch.equal(generate_new(model, prompts, 6), first)
    seen = {}
    original = model.generate

    def spy(**kwargs):
        seen.clear()
        seen.update(kwargs)
        kwargs.pop("sida_graphs", None)  # the offloaded model's generate takes it; transformers' does not
        return original(**kwargs)

    model.generate = spy
    generate_new(model, prompts, 4)
    call = plain_call(model, (), seen)
    assert call is not None and call[1] == 4 and call[2] is None and call[4] is None  # 4 greedy tokens, no EOS
    generate_new(model, prompts, 4, sample=True)
    call = plain_call(model, (), seen)
    assert call is not None and call[2] is None and call[4] == SamplingParams(1.0, 0, 1.0)  # unfiltered draws
    generate_new(model, prompts, 4, graphs=False)
    assert seen["sida_graphs"] is False


def test_report_outputs(tmp_path):
    rows = [
        {"system": "resident", "policy": "-", "predictor": "-", "budget_fraction": None, "batch_size": 1,
         "decode_tokens_per_s": 50.0, "peak_gpu_gib": 10.0},
    ]
    for pol in ("lru", "predictive"):
        for b in (0.1, 0.25, 0.5):
            rows.append({"system": "sida", "policy": pol, "predictor": "gate", "budget_fraction": b, "batch_size": 1,
                         "decode_tokens_per_s": 10 + 40 * b, "hit_rate": 0.5 + b / 2, "peak_gpu_gib": 2 + 8 * b})
    rows[1].update({"decode_ms_per_step": 8.25, "decode_spread": 0.031, "host_ms_per_step": 0.0625,
                    "decode_loop": "graph replay", "decode_hit_rate": 0.75, "decode_miss_mb_per_step": 2500.0,
                    "decode_copied_mb_per_step": 1050.0, "bound_tokens_per_s": 16.3, "fraction_of_bound": 0.705})
    md = markdown_table(rows)
    assert md.count("\n") == len(rows) + 2
    assert "| resident |" in md and "25%" in md and "hit rate" in md
    header = md.splitlines()[0]
    for col in ("ms/step", "spread", "host ms/step", "decode", "decode hit", "miss MB/step", "copied MB/step",
                "bound tok/s", "of bound"):
        assert f"| {col} |" in header, col
    assert "| 8.25 | 0.062 | graph replay |" in md and "| 75.0% | 2500.0 | 1050.0 | 16.30 | 70.5% |" in md
    assert "| 3.1% |" in md
    heads = [c.strip() for c in header.split("|")[1:-1]]
    resident = dict(zip(heads, (c.strip() for c in md.splitlines()[2].split("|")[1:-1])))
    assert all(resident[c] == "-" for c in ("ms/step", "host ms/step", "miss MB/step", "bound tok/s", "of bound"))
    assert plot_vs_budget(rows, "decode_tokens_per_s", "tok/s", tmp_path / "tps.png")
    assert (tmp_path / "tps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_vs_budget(rows, "missing_metric", "x", tmp_path / "none.png")
    events = [{"lane": "copy", "start_ms": 0.0, "dur_ms": 1.0}, {"lane": "compute", "start_ms": 0.5, "dur_ms": 2.0}]
    assert plot_timeline(events, tmp_path / "tl.png") and (tmp_path / "tl.png").stat().st_size > 1000
    write_json(tmp_path / "r.json", {"machine": "cpu"}, rows)
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["meta"]["machine"] == "cpu" and len(back["results"]) == len(rows)
