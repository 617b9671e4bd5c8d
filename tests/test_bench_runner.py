"""The end-to-end benchmark on the CPU with the tiny preset: every system runs on the same prompts,
the offloaded systems reproduce the resident model's tokens, and the oracle is an upper bound."""

import json

import pytest
import torch

from sida_moe.bench.config import BenchConfig
from sida_moe.bench.runner import run_bench


class FakeClock:
    """A clock for the timing code under test: read number i returns i**2 ms, so each timed
    interval is positive and a later call lasts longer than an earlier one (t(N) > t(1)) -- every
    figure is then a fixed function of the reads, not of how fast this machine ran (speed is
    measured by the benchmarks, not asserted here)."""

    def __init__(self) -> None:
        self.reads = 0

    def perf_counter(self) -> float:
        self.reads += 1
        return 1e-3 * self.reads**2

    process_time = perf_counter


@pytest.fixture
def fake_clock(monkeypatch):
    import sida_moe.bench.replay_probes as replay_probes
    import sida_moe.bench.timing as timing

    clock = FakeClock()
    monkeypatch.setattr(timing, "time", clock)
    monkeypatch.setattr(replay_probes, "time", clock)
    return clock


def test_bench_runs_all_systems_and_oracle_bounds_lru(tmp_path, fake_clock):
    cfg = BenchConfig(
        model="qwen3-moe-tiny", device="cpu", budgets=(0.25,), policies=("lru", "fifo", "belady"),
        predictors=("none", "next_layer_gate"), baselines=("resident", "ondemand_lru", "sida_sync"),
        prompt_tokens=6, new_tokens=4, rounds=2, timeline=False, out_dir=str(tmp_path), progress=False,
    )
    rows = run_bench(cfg)
    _check_timing_and_decode_columns(rows, cfg)
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
    # the oracle bounds the others by the policy's choices alone (the served hit rates also carry
    # copy timing on the host backend, so they do not order the same way every run)
    alone = {r["policy"]: r["policy_hit_rate"] for r in offloaded}
    assert set(alone) == {"lru", "fifo", "belady"} and all(0 < v <= 1 for v in alone.values()), alone
    assert alone["belady"] >= alone["lru"] and alone["belady"] >= alone["fifo"], alone
    assert len({r["policy_hit_rate"] for r in offloaded if r["policy"] == "lru"}) == 1  # one replay per policy
    for r in offloaded:
        assert r["decode_tokens_per_s"] > 0 and r["pcie_mb_per_token"] > 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved["results"]) == len(rows)
    assert (tmp_path / "bench.md").read_text().count("| sida |") == 6
    assert (tmp_path / "tokens_per_s_vs_budget.png").stat().st_size > 1000


def test_rows_that_run_out_of_memory_are_skipped_with_a_note(tmp_path, fake_clock, monkeypatch, capsys):
    """A budget whose cache does not fit next to what the process holds is skipped with one line
    and a note in bench.json; the smaller budget still runs (largest first)."""
    from sida_moe.engine import OffloadEngine

    reopen = OffloadEngine.reopen_cache

    def tight(self, num_slots, *a, **kw):
        if num_slots == self.slots_for(1.0):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB.")
        return reopen(self, num_slots, *a, **kw)

    monkeypatch.setattr(OffloadEngine, "reopen_cache", tight)
    cfg = BenchConfig(model="qwen3-moe-tiny", device="cpu", budgets=(1.0, 0.25), policies=("lru",),
                      predictors=("none",), baselines=(), prompt_tokens=6, new_tokens=4, rounds=1,
                      timeline=False, out_dir=str(tmp_path), progress=False)
    rows = run_bench(cfg)
    assert [(r["system"], r["budget_fraction"]) for r in rows] == [("sida", 0.25)]
    err = capsys.readouterr().err
    assert "sida-moe bench: note: skipping batch 1 at a 100% budget: out of memory (CUDA out of memory." in err
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["meta"]["skipped_out_of_memory"] == [
        {"rows": "batch 1 at a 100% budget", "error": "CUDA out of memory. Tried to allocate 6.00 GiB."}]


def _check_timing_and_decode_columns(rows, cfg):
    """Every row has its timing columns, computed from its rounds; every offloaded row its decode
    cache columns, consistent with each other; on the CPU the bound stays empty."""
    import math

    import sida_moe
    from sida_moe.preset_models import build_model

    engine = sida_moe.offload(build_model(cfg.model), gpu_budget=0.5, prefetch="none").sida_engine
    expert_nbytes = engine.expert_nbytes
    engine.close()
    assert rows and not any(r["system"] == "resident_graphed" for r in rows)  # CPU: skipped
    for r in rows:
        name = (r["system"], r["policy"], r["predictor"], r["budget_fraction"])
        assert r["rounds"] == cfg.rounds and len(r["decode_ms_per_step_rounds"]) == cfg.rounds, name
        for key in ("decode_ms_per_step", "host_ms_per_step", "ttft_ms", "prefill_tokens_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert r["decode_ms_per_step_min"] <= r["decode_ms_per_step"] <= r["decode_ms_per_step_max"], name
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch_size"] * 1e3 / r["decode_ms_per_step"]), name
        assert r["decode_spread"] == pytest.approx(
            (r["decode_ms_per_step_max"] - r["decode_ms_per_step_min"]) / r["decode_ms_per_step"]), name
        assert r["host_ms_method"] == "process CPU time", name
    offloaded = [r for r in rows if r["system"] != "resident"]
    for r in offloaded:
        name = (r["system"], r["policy"], r["predictor"], r["budget_fraction"])
        assert r["decode_loop"] == "eager" and r["decode_eager_steps"] == cfg.new_tokens - 1, name  # no graphs on a CPU
        assert r["decode_misses_served"] == "in place (zero-copy)", name  # the host backend decodes on the table
        assert 0.0 <= r["decode_hit_rate"] <= 1.0, name
        assert r["decode_miss_mb_per_step"] == pytest.approx(r["decode_misses_per_step"] * expert_nbytes / 1e6), name
        assert r["decode_copied_mb_per_step"] >= 0, name
        for key in ("bound_tokens_per_s", "fraction_of_bound", "zero_copy_gbps"):
            assert key in r and r[key] is None, (name, key)
    assert any(r["decode_misses_per_step"] > 0 for r in offloaded)  # the column measures something


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
    from sida_moe.preset_models import build_model

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

    from sida_moe.predictor.model import HashPredictor
    from sida_moe.predictor.config import PredictorConfig
    from sida_moe.preset_models import build_model

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
    from sida_moe.bench.inputs import prefetcher_for

    assert prefetcher_for("sida", cfg, oracle=True).feed_future is False
    assert prefetcher_for("sida@12", cfg).feed_future is True and prefetcher_for("sida@12", cfg).k == 12


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

    from sida_moe.bench.metrics import token_agreement

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
    from sida_moe.bench.metrics import logit_agreement

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

    from sida_moe.bench.metrics import engine_metrics

    cuda = engine_metrics({"stream_wait_seconds": 0.1, "acquire_stream_seconds": 0.3,
                            "host_stall_seconds": 0.7, "stream_waits": 5.0, "bytes_copied": 7e6}, 7, 1.0, 10**6)
    assert cuda["stall_seconds"] == 0.1 and cuda["stall_fraction"] == pytest.approx(0.1)
    assert cuda["acquire_stream_seconds"] == 0.3 and cuda["acquire_stream_fraction"] == pytest.approx(0.3)
    assert cuda["stream_waits"] == 5.0 and cuda["pcie_mb_per_token"] == pytest.approx(1.0)
    # the predictor's figures it reports, and none of those it does not (its metrics change)
    assert "predictor_recall" not in cuda
    # the link carries copies and the experts that table misses read in place
    zero_copy = engine_metrics({"bytes_copied": 7e6, "routed_misses": 2.0}, 7, 1.0, 35 * 10**5)
    assert zero_copy["pcie_mb_per_token"] == pytest.approx(2.0)
    sida = engine_metrics({"prefetch_scored_experts": 12.0, "prefetch_hit_rate": 0.5}, 7, 1.0, 10**6)
    assert sida["predictor_scored_experts"] == 12.0 and sida["predictor_recall"] == 0.5
    assert "predictor_precision" not in sida
    host = engine_metrics({"host_stall_seconds": 0.2, "stream_waits": 0.0}, 7, 1.0, 10**6)
    assert host["stall_seconds"] == 0.2 and host["stall_fraction"] == pytest.approx(0.2)
    assert host["acquire_stream_seconds"] is None and host["acquire_stream_fraction"] is None


def test_the_stall_timer_on_the_host_backend_times_nothing():
    """Copies are synchronous memcpy on the host backend: the cache's stream-wait timing stays off
    and the engine reports neither stream_wait_seconds nor acquire_stream_seconds."""
    import torch

    from _moe_models import greedy, prompt_batch, tiny_model
    import sida_moe
    from sida_moe.bench.observers import StallTimer

    model = sida_moe.offload(tiny_model("qwen3_moe", torch.float32), gpu_budget=0.5, prefetch="none")
    engine = model.sida_engine
    ids, mask = prompt_batch()
    with engine.observe(StallTimer()) as timer:
        assert timer.probe is None  # no stream-wait timing on the host backend
        with torch.inference_mode():
            greedy(model, ids, mask, 3)
        stats = engine.stats()
    assert stats["stream_waits"] == 0 and stats["misses"] > 0
    assert "stream_wait_seconds" not in stats and "acquire_stream_seconds" not in stats
    engine.close()


def test_decode_cache_metrics_are_the_n_token_call_less_the_one_token_call():
    from sida_moe.bench.metrics import decode_cache_metrics

    first = {"hits": 10.0, "misses": 30.0, "bytes_copied": 3e6, "forwards": 1.0}  # prefill + first token
    full = {"hits": 100.0, "misses": 60.0, "bytes_copied": 9e6, "forwards": 1.0}  # ... + 3 replayed steps
    got = decode_cache_metrics(first, full, 3, expert_nbytes=2_000_000)
    assert got["decode_hit_rate"] == pytest.approx(90 / 120)
    assert got["decode_misses_per_step"] == pytest.approx(10.0)
    assert got["decode_miss_mb_per_step"] == pytest.approx(20.0)  # 10 misses x 2 MB
    assert got["decode_copied_mb_per_step"] == pytest.approx(2.0)
    assert got["decode_eager_steps"] == 0.0
    eager = decode_cache_metrics(first, dict(full, forwards=4.0), 3, 1)
    assert eager["decode_eager_steps"] == 3.0
    assert decode_cache_metrics(first, first, 3, 1)["decode_hit_rate"] is None  # no lookup: no rate


def test_the_bound_and_each_rows_fraction_of_it():
    """1 / (t_step at 100% + miss bytes / zero-copy GB/s), batch rows per step; the 100% step is the
    fastest offloaded row at 100% of that batch size; empty without a 100% row or a bandwidth."""
    from sida_moe.bench.bound import attach_bounds, decode_bound

    # the session-9 H200 row: 8.3 ms at 100%, 2.5 GB of zero-copy misses per token at 47 GB/s
    assert decode_bound(1, 8.3, 2.5e9, 47.0) == pytest.approx(1 / (0.0083 + 2.5 / 47), rel=1e-9)
    assert decode_bound(8, 10.0, 0.0, 47.0) == pytest.approx(800.0)
    for bad in ((None, 0.0, 47.0), (8.3, None, 47.0), (8.3, 0.0, None), (0.0, 0.0, 47.0), (8.3, -1.0, 47.0),
                (float("nan"), 0.0, 47.0), (8.3, 0.0, 0.0)):
        assert decode_bound(1, *bad) is None, bad

    def row(system, budget, ms, miss, batch=1):
        return {"system": system, "batch_size": batch, "budget_fraction": budget, "decode_ms_per_step": ms,
                "decode_tokens_per_s": batch * 1e3 / ms, "decode_miss_mb_per_step": miss}

    rows = [{"system": "resident", "batch_size": 1, "budget_fraction": None, "decode_ms_per_step": 10.3,
             "decode_tokens_per_s": 97.0},
            row("sida", 1.0, 9.0, 0.0), row("ondemand_lru", 1.0, 8.3, 0.0), row("sida", 0.25, 87.0, 2500.0),
            row("sida", 0.25, 40.0, 100.0, batch=8)]
    attach_bounds(rows, {1: 47.0, 8: 47.0})
    assert "bound_tokens_per_s" not in rows[0]  # not an offloaded row
    assert all(r["bound_step_ms_at_full"] == 8.3 and r["zero_copy_gbps"] == 47.0 for r in rows[1:4])
    assert rows[1]["bound_tokens_per_s"] == pytest.approx(1e3 / 8.3)
    assert rows[1]["fraction_of_bound"] == pytest.approx(8.3 / 9.0) and rows[2]["fraction_of_bound"] == pytest.approx(1.0)
    slow = rows[3]
    assert slow["bound_tokens_per_s"] == pytest.approx(1 / (0.0083 + 2.5 / 47))
    assert slow["fraction_of_bound"] == pytest.approx((1e3 / 87.0) / slow["bound_tokens_per_s"])
    assert rows[4]["bound_step_ms_at_full"] is None and rows[4]["bound_tokens_per_s"] is None  # no 100% row at batch 8
    attach_bounds(rows, {1: None})  # the CPU: no link to bound by
    assert rows[1]["bound_tokens_per_s"] is None and rows[1]["fraction_of_bound"] is None


def test_zero_copy_probe_reads_the_pool_through_the_table_kernels(fake_clock):
    """On the host backend the probe runs the same calls (it measures host memory there; the bench
    uses it on CUDA only)."""
    import math

    import sida_moe
    from sida_moe.bench.bound import zero_copy_gbps
    from sida_moe.preset_models import build_model

    engine = sida_moe.offload(build_model("qwen3-moe-tiny"), gpu_budget=0.25, prefetch="none").sida_engine
    for batch in (1, 16):  # 16 x top-8 pairs > 64 experts: experts repeat
        gbps = zero_copy_gbps(engine, batch, calls=4)
        assert gbps is not None and math.isfinite(gbps) and gbps > 0
    engine.close()


def test_host_ms_is_the_enqueue_probe_of_replayed_steps_else_process_time():
    from sida_moe.bench.metrics import host_ms
    from sida_moe.bench.timing import Call, DecodeTiming, Round

    def rnd(cpu_full, enqueue):
        return Round(Call(0.1, 0.05), Call(0.5, cpu_full), extra={"enqueue_ms": enqueue})

    replayed = [rnd(0.4, 0.07), rnd(0.4, 0.05), rnd(0.4, 0.06)]
    timing = DecodeTiming(1, 4, 5, replayed)
    got = host_ms(replayed, timing, torch.device("cuda"))
    assert got["host_ms_per_step"] == pytest.approx(0.06) and got["host_ms_method"].startswith("enqueue")
    eager = [rnd(0.45, None), rnd(0.45, 0.05)]  # not every round replayed: process time
    got = host_ms(eager, DecodeTiming(1, 4, 5, eager), torch.device("cuda"))
    assert got["host_ms_per_step"] == pytest.approx(100.0) and "spin-waits" in got["host_ms_method"]
    got = host_ms(eager, DecodeTiming(1, 4, 5, eager), torch.device("cpu"))
    assert got["host_ms_method"] == "process CPU time"


def test_offload_drops_decode_steps_captured_on_the_resident_model():
    """resident_graphed runs the graphed loop on the model the bench offloads next: a step captured
    then would replay the original experts' kernels on freed memory."""
    import sida_moe
    from sida_moe.decode_graph import static_generate
    from sida_moe.preset_models import build_model

    model = build_model("qwen3-moe-tiny")
    static_generate(model, torch.randint(3, 200, (1, 5)), 3, graphs=False)
    assert model.__dict__.get("_sida_decode_steps")
    sida_moe.offload(model, gpu_budget=0.5, prefetch="none")
    assert "_sida_decode_steps" not in model.__dict__
    model.sida_engine.close()


def test_resident_graphed_needs_cuda():
    from sida_moe.bench.config import optional_parts

    cpu = optional_parts(BenchConfig(device="cpu", baselines=("resident", "resident_graphed")))
    assert cpu == (("resident",), False, "skipping the resident_graphed baseline: CUDA graphs need a CUDA device")
    # on CUDA (the device is only named here, never used) every batch size, left-padded ones too
    for sizes in ((1,), (1, 4), (4,)):
        got = optional_parts(BenchConfig(device="cuda", batch_sizes=sizes, baselines=("resident_graphed",)))
        assert got == (("resident_graphed",), False, None)


def _offloaded_with_a_decode_step(probe):
    """The tiny preset offloaded, after one static-loop call (its step kept, uncaptured on a CPU);
    ``probe`` (a replay probe) is checked to find nothing before that call."""
    import sida_moe
    from sida_moe.decode_graph import static_generate
    from sida_moe.preset_models import build_model

    model = sida_moe.offload(build_model("qwen3-moe-tiny"), gpu_budget=0.5, prefetch="none")
    assert probe(model, 1) is None  # nothing captured
    static_generate(model, torch.randint(3, 200, (1, 5)), 6, graphs=False)
    (step,) = model._sida_decode_steps.values()
    return model, model.sida_engine, step


def test_replay_probe_times_launch_and_hand_over_of_the_captured_step(fake_clock):
    """The host-cost probe of a replayed step: each replay is a launch and one routing hand-over to
    the engine, from positions reset so that extra replays stay inside the static cache (the
    graph here is a stand-in: a CPU captures none)."""
    from sida_moe.bench.replay_probes import replay_host_seconds

    model, engine, step = _offloaded_with_a_decode_step(replay_host_seconds)
    calls = []

    class Graph:
        def replay(self):
            calls.append(("replay", int(step.position), int(step.index)))

    class Fence:  # the completion events that bound the replays in flight
        def synchronize(self):
            calls.append("wait")

        def record(self):
            calls.append("record")

    step.graph = Graph()
    step.fences = [Fence(), Fence()]
    step.visits = ([0, 1], 8)
    handed = []
    engine.end_replayed_forward = lambda visits, width: handed.append((visits, width))
    reads = fake_clock.reads
    seconds = replay_host_seconds(model, 1, steps=5)
    # two clock reads around each replay: intervals (2j+1) ms for read pairs (reads + 2i, + 1); median
    intervals = sorted(1e-3 * ((reads + 2 * i + 2) ** 2 - (reads + 2 * i + 1) ** 2) for i in range(5))
    assert seconds == pytest.approx(intervals[2])
    assert calls == ["wait", ("replay", 0, 0), "record"] * 5 and handed == [([0, 1], 8)] * 5
    assert replay_host_seconds(model, 2) is None  # no step of that batch size
    engine.close()


def test_back_to_back_replays_run_the_decode_loop_between_two_drains(fake_clock):
    """The CPU probe of decode steps: ``steps`` replays as the decode loop makes them (each waits
    for the fence of the replay ``REPLAYS_IN_FLIGHT`` before it), from position 0, with the
    engine drained before and after so that its threads' work on those steps is inside."""
    from sida_moe.bench.replay_probes import replay_back_to_back

    model, engine, step = _offloaded_with_a_decode_step(replay_back_to_back)
    calls = []

    class Graph:
        def replay(self):
            calls.append(("replay", int(step.position), int(step.index)))
            step.position.add_(1)

    class Fence:
        def __init__(self, n):
            self.n = n

        def synchronize(self):
            calls.append(("wait", self.n))

        def record(self):
            calls.append(("record", self.n))

    step.graph, step.fences, step.replays = Graph(), [Fence(0), Fence(1)], 0
    step.visits = ([0, 1], 8)
    engine.end_replayed_forward = lambda visits, width: calls.append("hand over")
    engine.quiesce = lambda: calls.append("drain")
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="steps must be an int >= 1"):
            replay_back_to_back(model, 1, steps=bad)
    with pytest.raises(ValueError, match="at most the captured step's cache length 256"):
        replay_back_to_back(model, 1, steps=257)
    assert calls == []  # refused before anything ran
    reads = fake_clock.reads
    seconds = replay_back_to_back(model, 1, steps=3)
    # one clock read before the replays and one after: the interval over the 3 steps
    assert seconds == pytest.approx(1e-3 * ((reads + 2) ** 2 - (reads + 1) ** 2) / 3)
    assert calls == ["drain",
                     ("wait", 0), ("replay", 0, 0), ("record", 0), "hand over",
                     ("wait", 1), ("replay", 1, 0), ("record", 1), "hand over",
                     ("wait", 0), ("replay", 2, 0), ("record", 0), "hand over",
                     "drain"]
    assert replay_back_to_back(model, 2) is None  # no step of that batch size
    del engine.quiesce
    engine.close()


def _constant_trace(path, experts=64, k=8, layers=2, tokens=64):
    """Every token of every recorded layer routes to experts 0..k-1."""
    import numpy as np

    from sida_moe.bench import replay

    ids = np.broadcast_to(np.arange(k, dtype=np.uint8), (tokens, layers, k)).copy()
    replay.save_routing_trace(str(path), ids, {"num_experts": experts, "seq_len": tokens, "source": {"test": True}})
    return str(path)


def test_bench_replays_a_routing_trace_for_every_system(tmp_path, fake_clock):
    """With a trace that sends every token to the same 8 experts, an offloaded row holding 8
    slots per layer hits every decode visit (the tiny preset's own routers spread over 64 experts),
    every system sees the same routing (same tokens as resident), and bench.json says which trace."""
    trace = _constant_trace(tmp_path / "trace.npz")
    common = dict(model="qwen3-moe-tiny", device="cpu", budgets=(0.125,), policies=("lru",), predictors=("none",),
                  baselines=("resident",), prompt_tokens=6, new_tokens=6, rounds=1, timeline=False, progress=False)
    replayed = run_bench(BenchConfig(**common, routing_trace=trace, out_dir=str(tmp_path / "replayed")))
    routers = run_bench(BenchConfig(**common, out_dir=str(tmp_path / "routers")))
    sida = {name: next(r for r in rows if r["system"] == "sida") for name, rows in (("replayed", replayed), ("routers", routers))}
    assert sida["replayed"]["decode_hit_rate"] == 1.0
    assert sida["routers"]["decode_hit_rate"] < 0.9
    assert all(r["same_tokens_as_resident"] for r in replayed if r["system"] != "resident")
    meta = json.loads((tmp_path / "replayed" / "bench.json").read_text())["meta"]
    assert meta["routing"]["trace"] == trace and len(meta["routing"]["layer_map"]) == 4


def test_each_round_replays_new_routing_and_belady_follows_it(tmp_path, fake_clock, monkeypatch):
    """Round r of every system warms up at trace position 2 r S and times at (2 r + 1) S (S: the
    tokens of one call), so a timed decode is not a repeat of its warm-up; Belady's future is
    recorded at the same positions and stays at least as good as LRU."""
    import numpy as np

    from sida_moe.bench import replay

    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(64)[:8] for _ in range(400 * 2)]).reshape(400, 2, 8).astype(np.uint8)
    path = str(tmp_path / "random.npz")
    replay.save_routing_trace(path, ids, {"num_experts": 64, "seq_len": 400, "source": {"test": True}})
    resets = []
    reset = replay.ReplayRouting.reset
    monkeypatch.setattr(replay.ReplayRouting, "reset", lambda self, position=0: resets.append(position) or reset(self, position))
    cfg = BenchConfig(model="qwen3-moe-tiny", device="cpu", budgets=(0.25,), policies=("lru", "belady"),
                      predictors=("none",), baselines=("resident",), prompt_tokens=6, new_tokens=4, rounds=2,
                      timeline=False, routing_trace=path, out_dir=str(tmp_path / "out"), progress=False)
    rows = run_bench(cfg)
    S = 10
    # a visit: its warm-up, then the 1-token and N-token calls (round 0, then round 1)
    runs = ",".join(map(str, resets))
    assert f"0,{S},{S}" in runs and f"{2 * S},{3 * S},{3 * S}" in runs
    assert set(resets) == {0, S, 2 * S, 3 * S}
    # the policies alone on the last round's recorded visits (served rates also carry copy timing)
    hit = {r["policy"]: r["policy_hit_rate"] for r in rows if r["system"] == "sida"}
    assert hit["belady"] >= hit["lru"] > 0, hit
    assert all(r["same_tokens_as_resident"] for r in rows if r["system"] != "resident")
    meta = json.loads((tmp_path / "out" / "bench.json").read_text())["meta"]
    assert "2 r S" in meta["routing"]["positions"]


def test_bench_refuses_a_routing_trace_it_cannot_replay(tmp_path):
    from sida_moe.bench.config import BenchInputError

    with pytest.raises(BenchInputError, match="no such routing trace file"):
        run_bench(BenchConfig(device="cpu", routing_trace=str(tmp_path / "missing.npz"), progress=False))
    wrong = _constant_trace(tmp_path / "wrong.npz", experts=32, k=4)
    with pytest.raises(BenchInputError, match="32 experts top-4.*64 experts top-8"):
        run_bench(BenchConfig(device="cpu", routing_trace=wrong, budgets=(0.5,), policies=("lru",), predictors=("none",),
                              baselines=(), new_tokens=2, rounds=1, timeline=False, progress=False))


def test_bench_compile_needs_cuda():
    from sida_moe.bench.config import BenchInputError

    with pytest.raises(BenchInputError, match="compile: .* needs a CUDA device"):
        run_bench(BenchConfig(device="cpu", compile=True, progress=False))
