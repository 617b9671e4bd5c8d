"""The end-to-end benchmark on the CPU with the tiny preset: every system runs on the same prompts,
the offloaded systems reproduce the resident model's tokens, and the oracle is an upper bound."""

import json

import torch

from sida_moe.bench.runner import BenchConfig, run_bench


def test_bench_runs_all_systems_and_oracle_bounds_lru(tmp_path):
    cfg = BenchConfig(
        model="qwen3-moe-tiny", device="cpu", budgets=(0.25,), policies=("lru", "fifo", "belady"),
        predictors=("none", "next_layer_gate"), baselines=("resident", "ondemand_lru", "sida_sync"),
        prompt_tokens=6, new_tokens=4, timeline=False, out_dir=str(tmp_path), progress=False,
    )
    rows = run_bench(cfg)
    systems = {(r["system"], r["policy"], r["predictor"]) for r in rows}
    assert ("resident", "-", "-") in systems
    assert ("ondemand_lru", "lru", "none") in systems and ("sida_sync", "fifo", "none") in systems
    for pol in ("lru", "fifo", "belady"):
        for pred in ("none", "next_layer_gate"):
            assert ("sida", pol, pred) in systems
    offloaded = [r for r in rows if r["system"] != "resident"]
    assert all(r["same_tokens_as_resident"] for r in offloaded), [(r["system"], r["policy"]) for r in offloaded]
    resident = next(r for r in rows if r["system"] == "resident")
    assert {r["tokens_digest"] for r in offloaded} == {resident["tokens_digest"]}
    assert not any("first_token_differing_from_resident" in r for r in rows)
    # exact mode on the CPU (float32): the teacher-forced logits match the resident model's closely
    assert all(r["logits_max_abs_diff"] < 1e-3 for r in offloaded), [r["logits_max_abs_diff"] for r in offloaded]
    assert not any("resident_margin_at_first_difference" in r for r in rows)
    hit = {(r["policy"], r["predictor"]): r["hit_rate"] for r in rows if r["system"] == "sida"}
    assert hit[("belady", "none")] >= hit[("lru", "none")]
    assert hit[("belady", "none")] >= hit[("fifo", "none")]
    for r in offloaded:
        assert r["decode_tokens_per_s"] > 0 and r["pcie_mb_per_token"] > 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved["results"]) == len(rows)
    assert (tmp_path / "bench.md").read_text().count("| sida |") == 6
    assert (tmp_path / "tokens_per_s_vs_budget.png").stat().st_size > 1000


def test_bench_config_rejects_unknown_names():
    import pytest

    for bad in (dict(policies=("mru",)), dict(predictors=("magic",)), dict(baselines=("vllm",)), dict(budgets=(1.5,)),
                dict(predictors=("sida",)), dict(predictors=("sida@0",), predictor_path="p"),
                dict(predictors=("sida@x",), predictor_path="p"), dict(predictors=("gate@2",), predictor_path="p")):
        with pytest.raises(ValueError):
            run_bench(BenchConfig(**bad))


def test_bench_prompts_from_a_text_file(tmp_path):
    import inspect

    import sida_moe.bench.runner as runner

    text = tmp_path / "prompt.txt"
    text.write_text(inspect.getsource(runner))
    cfg = BenchConfig(model="qwen3-moe-tiny", device="cpu", budgets=(0.5,), policies=("lru",), predictors=("none",),
                      baselines=("resident",), prompt_tokens=12, new_tokens=3, batch_sizes=(2,), timeline=False,
                      prompt_file=str(text), progress=False)
    rows = run_bench(cfg)
    assert [r["system"] for r in rows] == ["resident", "sida"]
    assert rows[1]["same_tokens_as_resident"]
    short = tmp_path / "short.txt"
    short.write_text("ab")
    import pytest

    with pytest.raises(ValueError, match="fewer than prompt_tokens"):
        run_bench(BenchConfig(model="qwen3-moe-tiny", device="cpu", budgets=(0.5,), policies=("lru",),
                              predictors=("none",), baselines=(), prompt_file=str(short), progress=False))


def test_accelerate_device_map_sends_exactly_the_experts_to_the_cpu():
    import torch

    from sida_moe.bench.systems import _device_map, expert_module_names
    from sida_moe.presets import build_model

    model = build_model("qwen3-moe-tiny", device="cpu")
    experts = set(expert_module_names(model))
    dmap = _device_map(model, experts, torch.device("cuda", 0))
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        owners = [k for k in dmap if k == "" or name == k or name.startswith(k + ".")]
        assert len(owners) == 1, (name, owners)  # every tensor placed exactly once
        inside_experts = any(name.startswith(e + ".") for e in experts)
        assert dmap[owners[0]] == ("cpu" if inside_experts else "cuda:0"), name
    assert {k for k, v in dmap.items() if v == "cpu"} == experts


def test_bench_with_a_sida_predictor_and_more_predicted_experts(tmp_path):
    """'sida' and 'sida@K' run the SiDA prefetcher from a saved predictor (untrained here: the
    bench's plumbing, not its accuracy) with K experts per layer; exact mode keeps the resident
    model's tokens."""
    import torch

    from sida_moe.predictor.model import HashPredictor, PredictorConfig
    from sida_moe.presets import build_model

    c = build_model("qwen3-moe-tiny", device="cpu").config
    torch.manual_seed(0)
    HashPredictor(PredictorConfig(input_dim=c.hidden_size, num_moe_layers=c.num_hidden_layers, num_experts=c.num_experts,
                                  top_k=c.num_experts_per_tok, hidden=16)).save(tmp_path / "pred")
    cfg = BenchConfig(model="qwen3-moe-tiny", device="cpu", budgets=(0.25,), policies=("lru", "predictive"),
                      predictors=("none", "sida", "sida@12"), predictor_path=str(tmp_path / "pred"),
                      baselines=("resident",), prompt_tokens=6, new_tokens=4, timeline=False, progress=False)
    rows = [r for r in run_bench(cfg) if r["system"] == "sida"]
    got = {(r["policy"], r["predictor"]): r for r in rows}
    assert set(got) == {(p, q) for p in ("lru", "predictive") for q in ("none", "sida", "sida@12")}
    assert all(r["same_tokens_as_resident"] for r in rows)
    for policy in ("lru", "predictive"):
        assert got[(policy, "none")]["prefetch_issued"] == 0
        assert got[(policy, "sida")]["prefetch_issued"] > 0
        # the predictor's own figures (scored over the decode tokens) are reported for it, under
        # their own names, and only for it
        for name in ("sida", "sida@12"):
            sida = got[(policy, name)]
            assert 0.0 <= sida["predictor_recall"] <= 1.0 and 0.0 <= sida["predictor_precision"] <= 1.0
            assert 0.0 <= sida["hit_rate"] <= 1.0
        assert "predictor_recall" not in got[(policy, "none")]
    # under the Belady oracle the prefetcher must not overwrite the true future with its prediction
    from sida_moe.bench.runner import _make_prefetcher

    assert _make_prefetcher("sida", cfg, oracle=True).feed_future is False
    assert _make_prefetcher("sida@12", cfg).feed_future is True and _make_prefetcher("sida@12", cfg).k == 12


def test_fastest_experts_implementation_is_measured():
    """Each candidate that can be set is measured with the probe; the cheapest stays set; one that
    raises is skipped. A probe that returns a cost (seconds per decoded token) is ranked by it; one
    that returns None by its wall time."""
    import torch

    from sida_moe.bench.systems import set_fastest_experts_implementation

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.impl = None

        def set_experts_implementation(self, impl):
            if impl == "broken":
                raise ValueError("not available")
            self.impl = impl

    cost = {"slow": 3.0, "fast": 1.0, "eager": 2.0}
    model = Fake()
    best, got = set_fastest_experts_implementation(model, lambda: cost[model.impl],
                                                   candidates=["slow", "broken", "fast", "eager"])
    assert (best, got) == ("fast", cost) and model.impl == "fast"
    model = Fake()
    best, wall = set_fastest_experts_implementation(model, lambda: None, candidates=["slow", "fast", "eager"])
    assert set(wall) == {"slow", "fast", "eager"} and best == min(wall, key=wall.get) == model.impl
    assert set_fastest_experts_implementation(Fake(), None, candidates=["broken", "eager"]) == ("eager", {})


def test_token_agreement_says_where_tokens_differ():
    import torch

    from sida_moe.bench.runner import token_agreement

    ref = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    same = token_agreement(ref.clone(), ref)
    assert same["same_tokens_as_resident"] and "first_token_differing_from_resident" not in same
    other = ref.clone()
    other[1, 2:] = 9
    got = token_agreement(other, ref)
    assert got["same_tokens_as_resident"] is False and got["first_token_differing_from_resident"] == 2
    assert got["tokens_digest"] != same["tokens_digest"] and len(got["tokens_digest"]) == 12
    assert set(token_agreement(ref, None)) == {"tokens_digest"}


def test_logit_agreement_reports_the_difference_and_the_resident_margin_where_tokens_split():
    from sida_moe.bench.runner import logit_agreement

    ref = torch.zeros(2, 3, 5)
    ref[0, 1, :2] = torch.tensor([2.0, 1.5])  # row 0, step 1: a 0.5 margin between the top two
    ref[1, 1, :2] = torch.tensor([4.0, 1.0])
    got = ref.clone()
    got[1, 2, 4] += 0.25
    same = logit_agreement(got, ref, None)
    assert same == {"logits_max_abs_diff": 0.25}
    split = logit_agreement(got, ref, 1)
    assert split["resident_margin_at_first_difference"] == 0.5  # the smaller margin of the two rows
    assert "resident_margin_at_first_difference" not in logit_agreement(got, ref, 3)


def test_engine_metrics_stall_is_the_gpu_wait_and_acquire_is_reported_beside_it():
    import pytest

    from sida_moe.bench.runner import _engine_metrics
    from sida_moe.bench.timing import GenerationTiming

    class Engine:
        def __init__(self, stats):
            self._stats = stats

        def stats(self):
            return self._stats

    timing = GenerationTiming(batch_size=1, prompt_tokens=4, new_tokens=3, ttft_s=0.5, token_latencies_s=[0.25, 0.25])
    cuda = _engine_metrics(Engine({"stream_wait_seconds": 0.1, "acquire_stream_seconds": 0.3,
                                   "host_stall_seconds": 0.7, "stream_waits": 5.0}), timing)
    assert cuda["stall_seconds"] == 0.1 and cuda["stall_fraction"] == pytest.approx(0.1)
    assert cuda["acquire_stream_seconds"] == 0.3 and cuda["acquire_stream_fraction"] == pytest.approx(0.3)
    assert cuda["stream_waits"] == 5.0
    host = _engine_metrics(Engine({"host_stall_seconds": 0.2, "stream_waits": 0.0}), timing)
    assert host["stall_seconds"] == 0.2 and host["stall_fraction"] == pytest.approx(0.2)
    assert host["acquire_stream_seconds"] is None and host["acquire_stream_fraction"] is None


def test_measure_stalls_on_the_host_backend_times_nothing():
    """Copies are synchronous memcpy on the host backend: the cache's stream-wait timing stays off
    and the engine reports neither stream_wait_seconds nor acquire_stream_seconds."""
    import torch

    from _moe_models import greedy, prompt_batch, tiny_model
    import sida_moe

    model = sida_moe.offload(tiny_model("qwen3_moe", torch.float32), gpu_budget=0.5, prefetch="none")
    engine = model.sida_engine
    engine.measure_stalls = True
    assert engine.measure_stalls and engine.cache.measure_stream_waits is False
    ids, mask = prompt_batch()
    with torch.inference_mode():
        greedy(model, ids, mask, 3)
    stats = engine.stats()
    assert stats["stream_waits"] == 0 and stats["misses"] > 0
    assert "stream_wait_seconds" not in stats and "acquire_stream_seconds" not in stats
    engine.close()
