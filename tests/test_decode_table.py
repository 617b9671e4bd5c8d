"""Decode through the expert table: layers read each expert wherever it is (slot or pinned pool),
the cache learns of the visit after the forward, and the greedy loop (eager here, a CUDA graph on
the GPU) gives transformers' own tokens."""

import copy
import warnings

import pytest
import torch

from _moe_models import eager_experts, tiny_model
from sida_moe.visit_trace import VisitRecorder
import sida_moe
from sida_moe.decode_graph import static_generate

DECODER_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]


def _pair(family, budget, policy="lru", prefetch="none", **kw):
    original = eager_experts(tiny_model(family))
    offloaded = sida_moe.offload(copy.deepcopy(original), gpu_budget=budget, policy=policy, prefetch=prefetch, **kw)
    return original, offloaded


def _cuda_pair(family="qwen3_moe"):
    """A tiny fp16 model on the GPU and its offloaded copy at 25%, LRU, no prefetch."""
    original = tiny_model(family, torch.float16).cuda()
    return original, sida_moe.offload(copy.deepcopy(original), gpu_budget="25%", policy="lru", prefetch="none")


def _prompt(batch=1, length=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 90, (batch, length), generator=g)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_greedy_loop_matches_transformers_generate(family):
    original, offloaded = _pair(family, "30%")
    ids = _prompt()
    with torch.inference_mode():
        want = original.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        got = static_generate(offloaded, ids, 10, pad_token_id=0, graphs=False)
    assert torch.equal(want, got)
    stats = sida_moe.engine_of(offloaded).stats()
    # decode steps (one token) went through the table, and the cache heard of every visit
    assert stats["table_layer_calls"] > 0
    assert stats["routed_visits"] == stats["table_layer_calls"]
    assert stats["hits"] + stats["misses"] > 0


def test_decode_misses_are_loaded_so_later_steps_hit():
    original, offloaded = _pair("qwen3_moe", "100%")
    engine = sida_moe.engine_of(offloaded)
    ids = _prompt(length=1)  # the prompt itself is a one-token (table) forward
    with torch.inference_mode():
        static_generate(offloaded, ids, 1, graphs=False)
        first = engine.stats()
        assert first["hits"] == 0 and first["misses"] > 0 and first["acquires"] == 0
        engine.quiesce()
        # every miss was loaded: its table entry now points at a slot holding its bytes
        table = engine.expert_table
        in_slots = list(engine.cache.resident().items())
        assert len(in_slots) == first["misses"]
        base, nbytes = engine.slot_memory.data_ptr(), engine.pool.expert_nbytes
        for (layer, expert), slot in in_slots:
            assert int(table[layer * engine.max_experts + expert]) == base + slot * nbytes
        engine.reset_stats()
        offloaded(input_ids=ids)  # the same token again: every expert is a hit now
        again = engine.stats()
    assert again["misses"] == 0 and again["hits"] == first["misses"]


def test_eviction_points_the_entry_back_at_the_pool():
    original, offloaded = _pair("qwen3_moe", "13%", copy_workers=1)
    engine = sida_moe.engine_of(offloaded)
    with torch.inference_mode():
        for seed in range(6):
            offloaded(input_ids=_prompt(length=1, seed=seed))
    engine.quiesce()
    stats = engine.stats()
    assert stats["evictions"] > 0
    resident = engine.cache.resident()
    base, nbytes = engine.slot_memory.data_ptr(), engine.pool.expert_nbytes
    for layer in engine.layers:
        for e in range(layer.num_experts):
            entry = int(engine.expert_table[layer.ordinal * engine.max_experts + e])
            slot = resident.get((layer.ordinal, e))
            if slot is None:
                assert not (base <= entry < base + engine.num_slots * nbytes), f"({layer.ordinal}, {e}) points at a slot"
            else:
                assert entry == base + slot * nbytes


def test_hostile_routing_under_a_tiny_budget_stays_exact():
    """Many decode steps with copy threads admitting and evicting under a minimal budget while the
    inference thread reads slots through the table: every step's logits equal the original's."""
    original, offloaded = _pair("qwen3_moe", "12.5%", copy_workers=3)  # one layer's top-k: the minimum
    engine = sida_moe.engine_of(offloaded)
    assert engine.num_slots == max(layer.top_k for layer in engine.layers)
    g = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        for _ in range(40):
            ids = torch.randint(3, 90, (1, 1), generator=g)
            assert torch.equal(original(input_ids=ids).logits, offloaded(input_ids=ids).logits)
    stats = engine.stats()
    assert stats["evictions"] > 10 and stats["table_layer_calls"] >= 40


def test_prefill_still_acquires_and_decode_uses_the_table():
    original, offloaded = _pair("qwen3_moe", "50%")
    engine = sida_moe.engine_of(offloaded)
    long_prompt = _prompt(length=64)
    layer = engine.layers[0]
    assert not engine.uses_table(0, 64) and engine.uses_table(0, 1)
    with torch.inference_mode():
        want = original.generate(long_prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        got = static_generate(offloaded, long_prompt, 4, pad_token_id=0, graphs=False)
    assert torch.equal(want, got)
    stats = engine.stats()
    assert stats["acquires"] > 0 and stats["table_layer_calls"] == 3 * len(engine.layers)
    assert layer.top_k >= 1


def test_the_loop_and_transformers_generate_share_an_engine_in_and_out_of_inference_mode():
    original, offloaded = _pair("qwen3_moe", "50%")
    ids = _prompt()
    with torch.inference_mode():
        want = original.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(static_generate(offloaded, ids, 5, pad_token_id=0, graphs=False), want)
    assert torch.equal(offloaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), want)


def test_model_generate_keeps_transformers_loop_off_cuda():
    original, offloaded = _pair("mixtral", "50%")
    ids = _prompt()
    with torch.inference_mode():
        want = original.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(offloaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), want)
        with pytest.raises(ValueError, match="cannot use the graphed decode step"):
            offloaded.generate(ids, max_new_tokens=6, do_sample=False, sida_graphs=True)


def test_static_generate_rejects_bad_input():
    _, offloaded = _pair("mixtral", "50%")
    with pytest.raises(ValueError, match="max_new_tokens"):
        static_generate(offloaded, _prompt(), 0)
    with pytest.raises(ValueError, match="input_ids"):
        static_generate(offloaded, torch.zeros(3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="context"):
        static_generate(offloaded, _prompt(), 10**6)



def test_greedy_loop_serves_a_plain_transformers_model_and_reuses_its_static_cache():
    model = eager_experts(tiny_model("olmoe"))
    with torch.inference_mode():
        for seed, new in ((1, 7), (2, 5), (3, 9)):  # one cache-length bucket, reset between calls
            ids = _prompt(seed=seed)
            want = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)
            assert torch.equal(static_generate(model, ids, new, graphs=False), want)
    assert len(model._sida_decode_steps) == 1


def test_a_call_reuses_the_shortest_longer_step_instead_of_making_one():
    model = eager_experts(tiny_model("olmoe"))
    ids = _prompt(length=4)
    with torch.inference_mode():
        for new in (296, 60, 700, 400):  # needs 300 (-> 512), 64, 704 (-> 1024), 404
            want = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)
            assert torch.equal(static_generate(model, ids, new, graphs=False), want)
    assert sorted(key.length for key in model._sida_decode_steps) == [512, 1024]


def test_kept_decode_steps_are_bounded_least_recently_used_first(monkeypatch):
    from sida_moe import decode_graph

    monkeypatch.setattr(decode_graph, "MAX_KEPT_STEPS", 2)
    model = eager_experts(tiny_model("olmoe"))
    with torch.inference_mode():
        for batch in (1, 2, 1, 3):  # batch 1 used again before batch 3 arrives: batch 2 is the oldest
            ids = _prompt(batch=batch, seed=batch)
            want = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert torch.equal(static_generate(model, ids, 5, graphs=False), want)
    assert [key.batch for key in model._sida_decode_steps] == [1, 3]


def test_compiled_decode_compiles_each_new_shape_past_dynamos_recompile_limit():
    """torch._dynamo runs a function eagerly once it holds ``recompile_limit`` compiled versions;
    the compiled decode step makes room, so a new batch size compiles instead of silently running
    uncompiled."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = eager_experts(tiny_model("olmoe"))
    # (the config's own patch: pytest's monkeypatch cannot restore a torch config entry)
    with torch._dynamo.config.patch(recompile_limit=1), torch.inference_mode():
        for batch in (1, 2):
            ids = _prompt(batch=batch, seed=batch)
            before = counters["stats"]["unique_graphs"]
            want = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(static_generate(model, ids, 4, graphs=False, compile=True), want)
            assert counters["stats"]["unique_graphs"] > before, f"batch {batch} ran its step uncompiled"
        assert torch._dynamo.config.recompile_limit == 1  # the room is only taken while a step runs


def test_eos_pads_like_transformers():
    original, offloaded = _pair("qwen3_moe", "50%")
    ids = _prompt(batch=2)
    with torch.inference_mode():
        free = original.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        eos = int(free[0, ids.shape[1] + 2])  # a token row 0 produces early
        want = original.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
        got = static_generate(offloaded, ids, 8, eos_token_id=eos, pad_token_id=0, graphs=False)
    assert torch.equal(want, got)


def test_compiled_decode_step_gives_the_eager_tokens_and_feeds_the_cache():
    # fp32: inductor's fused reductions round within ~1e-6 of eager, far from any greedy tie here
    original, offloaded = _pair("qwen3_moe", "30%")
    engine = sida_moe.engine_of(offloaded)
    ids = _prompt(batch=2)
    with torch.inference_mode():
        want = static_generate(offloaded, ids, 8, graphs=False)
        engine.reset_stats()
        got = static_generate(offloaded, ids, 8, graphs=False, compile=True)
        assert torch.equal(got, want)
        stats = engine.stats()
        # the compiled step's layers are the custom op: each still read through the table and
        # handed its routing to the cache
        prefill = len(engine.layers) if engine.uses_table(0, ids.numel()) else 0
        assert stats["table_layer_calls"] == 7 * len(engine.layers) + prefill
        assert stats["routed_visits"] == stats["table_layer_calls"]
        assert torch.equal(static_generate(offloaded, ids, 8, graphs=False, compile=True), want)  # reused
        assert torch.equal(original.generate(ids, max_new_tokens=8, do_sample=False), want)


def test_torch_compile_of_an_offloaded_model_runs_prefill_through_the_acquire_path():
    original, offloaded = _pair("qwen3_moe", "30%")
    engine = sida_moe.engine_of(offloaded)
    length = 4
    while engine.uses_table(0, 2 * length):
        length *= 2  # long enough for prefill's acquire path
    ids = _prompt(batch=2, length=length)
    with torch.inference_mode():
        want = original(input_ids=ids).logits
        engine.reset_stats()
        got = torch.compile(offloaded)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert engine.stats()["acquires"] > 0


def test_compile_switch_is_checked():
    _, offloaded = _pair("qwen3_moe", "50%")
    with pytest.raises(TypeError, match="compile must be a bool"):
        static_generate(offloaded, _prompt(), 4, compile="yes")
    with pytest.raises(ValueError, match="sida_compile=True"):
        offloaded.generate(_prompt(), max_new_tokens=4, do_sample=False, sida_compile=True)  # CPU: no graphs
    with pytest.raises(ValueError, match="needs sida_graphs"):
        offloaded.generate(_prompt(), max_new_tokens=4, sida_compile=True, sida_graphs=False)


def test_offloaded_experts_op_refuses_a_closed_engine():
    from sida_moe.experts import offloaded_experts

    with pytest.raises(RuntimeError, match="no live engine"):
        offloaded_experts(torch.zeros(1, 8), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), 10**9, 0)


@pytest.mark.gpu
def test_compiled_cuda_graph_decode_replays_the_compiled_step():
    original, offloaded = _cuda_pair()
    ids = _prompt(batch=2, length=6).cuda()
    with torch.inference_mode():
        eager = static_generate(offloaded, ids, 24, graphs=False, compile=True)
        graphed = offloaded.generate(ids, max_new_tokens=24, do_sample=False, sida_compile=True)
        again = offloaded.generate(ids, max_new_tokens=24, do_sample=False, sida_compile=True)
        plain = offloaded.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(eager, graphed) and torch.equal(graphed, again)
    # compiled and uncompiled steps are captured apart and both kept
    assert {key.compiled for key in offloaded._sida_decode_steps} == {False, True}
    assert plain.shape == graphed.shape


def test_the_loop_stops_soon_after_every_row_has_finished():
    from sida_moe.decode_graph import FINISHED_CHECK_EVERY

    original, offloaded = _pair("qwen3_moe", "50%")
    ids = _prompt(batch=2)
    with torch.inference_mode():
        free = original.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        eos = [int(free[0, ids.shape[1] + 1]), int(free[1, ids.shape[1] + 2])]  # row 0 ends at 2, row 1 by 3
        want = original.generate(ids, max_new_tokens=200, do_sample=False, eos_token_id=eos, pad_token_id=0)
        forwards = []
        hook = offloaded.register_forward_pre_hook(lambda m, a, kw: forwards.append(1), with_kwargs=True)
        got = static_generate(offloaded, ids, 200, eos_token_id=eos, pad_token_id=0, graphs=False)
        hook.remove()
    assert torch.equal(got, want)
    assert want.shape[1] - ids.shape[1] <= 3
    assert len(forwards) <= 3 + FINISHED_CHECK_EVERY  # not the 200 asked for
    with torch.inference_mode():  # any number of EOS ids, ids past the vocabulary ignored
        many = eos + [t for t in range(80, 100) if t not in eos][:9] + [10**9]
        want = original.generate(ids, max_new_tokens=200, do_sample=False, eos_token_id=many, pad_token_id=0)
        assert torch.equal(static_generate(offloaded, ids, 200, eos_token_id=many, pad_token_id=0, graphs=False), want)
    with torch.inference_mode():  # without EOS ids the call runs to its length
        assert static_generate(offloaded, ids, 20, graphs=False).shape[1] == ids.shape[1] + 20


@pytest.mark.parametrize("sample", [False, True])
def test_min_new_tokens_forbids_eos_as_transformers_does(sample):
    """min_new_tokens: the EOS ids are masked until that many tokens are out (the prefill's token
    included), greedy and sampled, then the loop stops as before; generate calls carry it."""
    from sida_moe.generate_route import plain_call
    from sida_moe.sampling import SamplingParams

    original, offloaded = _pair("qwen3_moe", "50%")
    ids = _prompt(batch=2)
    params = SamplingParams(0.8, 20, 0.9) if sample else None
    kw = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9) if sample else dict(do_sample=False)
    with torch.inference_mode():
        torch.manual_seed(5)
        free = original.generate(ids, max_new_tokens=8, pad_token_id=0, **kw)
        eos = [int(free[0, ids.shape[1]]), int(free[1, ids.shape[1] + 1])]  # what rows 0 and 1 make first / second
        for min_new in (0, 1, 4):
            torch.manual_seed(5)
            want = original.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0,
                                     min_new_tokens=min_new, **kw)
            torch.manual_seed(5)
            got = static_generate(offloaded, ids, 12, eos_token_id=eos, pad_token_id=0, graphs=False, sampling=params,
                                  min_new_tokens=min_new)
            assert torch.equal(got, want), min_new
            if min_new == 4:
                assert not torch.isin(got[:, ids.shape[1]: ids.shape[1] + 4], torch.tensor(eos)).any()
    call = plain_call(offloaded, (ids,), {"max_new_tokens": 6, "min_new_tokens": 3, "eos_token_id": eos})
    assert call is not None and call.min_new_tokens == 3
    with pytest.raises(ValueError, match="min_new_tokens must be an int >= 0"):
        static_generate(offloaded, ids, 4, graphs=False, min_new_tokens=-1)


@pytest.mark.gpu
def test_graphed_loop_stops_soon_after_every_row_has_finished():
    from sida_moe.decode_graph import FINISHED_CHECK_EVERY, REPLAYS_IN_FLIGHT

    original, offloaded = _cuda_pair()
    ids = _prompt(batch=2, length=6).cuda()
    with torch.inference_mode():
        free = offloaded.generate(ids, max_new_tokens=12, do_sample=False, sida_graphs=True, eos_token_id=None)
        eos = [int(free[0, ids.shape[1] + 4]), int(free[1, ids.shape[1] + 5])]
        want = original.generate(ids, max_new_tokens=300, do_sample=False, eos_token_id=eos, pad_token_id=0)
        engine = sida_moe.engine_of(offloaded)
        engine.reset_stats()
        got = offloaded.generate(ids, max_new_tokens=300, do_sample=False, eos_token_id=eos, pad_token_id=0,
                                 sida_graphs=True)
    assert torch.equal(got, want)
    layers = len(engine.layers)
    # the look at the finished flag lands a check or two (and the queued replays) late, not 300 steps
    assert engine.stats()["routed_visits"] <= layers * (6 + 3 * FINISHED_CHECK_EVERY + REPLAYS_IN_FLIGHT)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe"])
def test_cuda_graph_decode_matches_eager(family):
    original, offloaded = _cuda_pair(family)
    ids = _prompt(length=6).cuda()
    with torch.inference_mode():
        eager = static_generate(offloaded, ids, 24, graphs=False)
        graphed = offloaded.generate(ids, max_new_tokens=24, do_sample=False, sida_graphs=True)
        want = original.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(eager, graphed)
    assert torch.equal(graphed, want)
    stats = sida_moe.engine_of(offloaded).stats()
    assert stats["routed_visits"] > 20 * len(sida_moe.engine_of(offloaded).layers)


def _tiny_sida_pair(seed, **prefetcher_kwargs):
    """A tiny fp16 Qwen3-MoE on the GPU and its copy offloaded at 25% with a random SiDA
    predictor (``prefetcher_kwargs`` to ``SidaPrefetcher``): (original, offloaded, prefetcher)."""
    from sida_moe.predictor import HashPredictor, PredictorConfig, SidaPrefetcher

    original = tiny_model("qwen3_moe", torch.float16).cuda()
    cfg = original.config
    torch.manual_seed(seed)
    prefetcher = SidaPrefetcher(HashPredictor(PredictorConfig(
        input_dim=cfg.hidden_size, num_moe_layers=cfg.num_hidden_layers, num_experts=cfg.num_experts,
        top_k=cfg.num_experts_per_tok, hidden=32, attn_blocks=1, attn_heads=4)), **prefetcher_kwargs)
    offloaded = sida_moe.offload(copy.deepcopy(original), gpu_budget="25%", policy="predictive", prefetch=prefetcher)
    return original, offloaded, prefetcher


@pytest.mark.gpu
def test_cuda_graph_decode_with_the_sida_predictor_is_exact_and_prefetches():
    """The predictor's step runs beside each replayed decode step (its side step): tokens equal
    the eager loop's and the original's, each decode token's prediction is scored -- with the
    eager loop's scores, so with its predictions -- and the cache loaded predicted experts that
    decode then used."""
    original, offloaded, _ = _tiny_sida_pair(3)
    cfg = original.config
    engine = sida_moe.engine_of(offloaded)
    ids = _prompt(length=6).cuda()
    new = 24
    scores = ("predicted_hits", "predicted_needed", "predicted_experts")
    with torch.inference_mode():
        engine.reset_stats()
        eager = static_generate(offloaded, ids, new, graphs=False)
        engine.wait_deferred(10.0)
        eager_scores = [engine.stats()[name] for name in scores]
        engine.reset_stats()
        graphed = offloaded.generate(ids, max_new_tokens=new, do_sample=False, sida_graphs=True)
        want = original.generate(ids, max_new_tokens=new, do_sample=False)
    assert torch.equal(eager, graphed)
    assert torch.equal(graphed, want)
    engine.wait_deferred(10.0)
    stats = engine.stats()
    layers, k = len(engine.layers), cfg.num_experts_per_tok
    # every decode token but the first was predicted ahead and scored against its routing
    assert stats["predicted_needed"] >= (new - 2) * layers * k * 0.9
    assert 0 < stats["predicted_hits"] <= stats["predicted_needed"]
    assert [stats[name] for name in scores] == eager_scores
    assert stats["prefetch_issued"] > 0


@pytest.mark.gpu
def test_graphed_hash_routing_routes_each_step_by_the_prediction_beside_the_step_before():
    """With hash routing decode step t+1 routes by the prediction the side step made after step
    t: the graphed loop's tokens equal the eager loop's over many replays (a prediction read
    before it was written, or staged inputs overwritten before the side step copied them, would
    change them)."""
    _, offloaded, _ = _tiny_sida_pair(4, hash_routing=True)
    ids = _prompt(batch=2, length=6).cuda()
    with torch.inference_mode():
        eager = static_generate(offloaded, ids, 40, graphs=False)
        graphed = static_generate(offloaded, ids, 40, graphs=True)
    assert torch.equal(eager, graphed)


@pytest.mark.gpu
def test_compiled_cuda_graph_decode_with_the_sida_predictor_replays_its_compiled_step():
    """sida_compile=True: the side step replays the compiled predictor step; tokens
    equal the compiled eager loop's, every decode token's prediction is scored."""
    original, offloaded, prefetcher = _tiny_sida_pair(3)
    cfg = original.config
    engine = sida_moe.engine_of(offloaded)
    ids = _prompt(length=6).cuda()
    new = 24
    with torch.inference_mode():
        eager = static_generate(offloaded, ids, new, graphs=False, compile=True)
        engine.reset_stats()
        graphed = offloaded.generate(ids, max_new_tokens=new, do_sample=False, sida_compile=True)
    assert torch.equal(eager, graphed)
    assert all(d._compiled is not None for d in prefetcher._decoders.values())
    engine.wait_deferred(10.0)
    stats = engine.stats()
    layers, k = len(engine.layers), cfg.num_experts_per_tok
    assert stats["predicted_needed"] >= (new - 2) * layers * k * 0.9
    assert 0 < stats["predicted_hits"] <= stats["predicted_needed"]


def test_recorded_visits_include_table_layers_and_make_the_predictive_policy_belady():
    """The visit sequence a benchmark records covers decode layers too, and fed back as the
    future it makes the predictive policy miss no more than LRU on the same steps."""
    original = eager_experts(tiny_model("qwen3_moe"))
    ids = [_prompt(length=1, seed=s) for s in range(12)]

    def run(policy, future=None):
        m = sida_moe.offload(copy.deepcopy(original), gpu_budget="25%", policy=policy, prefetch="none", copy_workers=0)
        engine = sida_moe.engine_of(m)
        if future is not None:
            engine.set_future(future)
        with torch.inference_mode(), engine.observe(VisitRecorder()) as recorder:
            trace = recorder.trace
            for x in ids:
                m(input_ids=x)
                engine.quiesce()
                engine.cache.synchronize()
        return engine.stats(), trace

    lru, trace = run("lru")
    assert len(trace) == 12 * len(sida_moe.engine_of(sida_moe.offload(copy.deepcopy(original), gpu_budget=1.0)).layers)
    belady, _ = run("predictive", trace)
    assert belady["misses"] <= lru["misses"]


class _SlowGraph:
    """A captured step made slow on the device (a spin kernel before each replay), recording at
    each launch how many earlier replays had not finished yet."""

    def __init__(self, graph, cycles):
        self.graph, self.cycles, self.done, self.unfinished = graph, cycles, [], []

    def replay(self):
        self.unfinished.append(sum(not e.query() for e in self.done))
        torch.cuda._sleep(self.cycles)
        self.graph.replay()
        e = torch.cuda.Event()
        e.record()
        self.done.append(e)


@pytest.mark.gpu
def test_graphed_decode_queues_at_most_two_replays():
    """An evicted slot is refilled only after every replay queued when it was evicted: the loop
    keeps two replays queued (one running, the next waiting), never the whole call, so copies
    land within the call however slow a step is."""
    from sida_moe import decode_graph

    original, offloaded = _cuda_pair()
    ids = _prompt(length=6).cuda()
    with torch.inference_mode():
        # EOS off: every call runs its 11 decode steps
        want = offloaded.generate(ids, max_new_tokens=12, do_sample=False, sida_graphs=True, eos_token_id=None)
        (step,) = [s for s in offloaded._sida_decode_steps.values() if s.graph is not None]
        slow = step.graph = _SlowGraph(step.graph, cycles=20_000_000)  # ~10 ms per replay
        got = offloaded.generate(ids, max_new_tokens=12, do_sample=False, sida_graphs=True, eos_token_id=None)
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    assert len(slow.unfinished) == 11  # every decode step after the first token is a replay
    assert max(slow.unfinished) <= decode_graph.REPLAYS_IN_FLIGHT - 1, slow.unfinished


@pytest.mark.gpu
def test_table_reads_are_fenced_on_the_stream_each_call_runs_on():
    """Evictions wait for the stream decode steps read the table on: replays of a step captured on
    the default stream, launched on another stream, move the cache's reader stream there (after
    the default stream's queued reads), and an eager forward on the default stream moves it back;
    the tokens stay the original model's, with replays slowed so that evictions overlap them."""
    original, offloaded = _cuda_pair()
    engine = sida_moe.engine_of(offloaded)
    ids = _prompt(length=6).cuda()
    default, side = torch.cuda.current_stream(), torch.cuda.Stream()
    args = dict(max_new_tokens=16, do_sample=False, eos_token_id=None)
    with torch.inference_mode():
        want = original.generate(ids, **args)
        first = offloaded.generate(ids, sida_graphs=True, **args)
        assert engine.cache.reader_stream == default.cuda_stream
        (step,) = [s for s in offloaded._sida_decode_steps.values() if s.graph is not None]
        step.graph = _SlowGraph(step.graph, cycles=5_000_000)
        evictions = engine.stats()["evictions"]
        side.wait_stream(default)
        with torch.cuda.stream(side):
            moved = offloaded.generate(ids, sida_graphs=True, **args)
            assert engine.cache.reader_stream == side.cuda_stream
        default.wait_stream(side)
        back = offloaded.generate(ids, sida_graphs=False, **args)  # transformers' loop, eager table reads
        assert engine.cache.reader_stream == default.cuda_stream
    torch.cuda.synchronize()
    assert engine.stats()["evictions"] > evictions
    for got in (first, moved, back):
        assert torch.equal(got, want)


def _left_padded(batch_lengths, length, seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (len(batch_lengths), length), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(batch_lengths):
        mask[row, length - n:] = 1
        ids[row, : length - n] = 0  # the pad token
    return ids, mask


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_left_padded_batches_give_transformers_tokens(family):
    original, offloaded = _pair(family, "30%")
    ids, mask = _left_padded([7, 3, 5], 7)
    with torch.inference_mode():
        want = original.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        got = static_generate(offloaded, ids, 8, attention_mask=mask, graphs=False)
        assert torch.equal(got, want)
        # the same loop on transformers' own model (the bench's resident_graphed at batch > 1)
        assert torch.equal(static_generate(original, ids, 8, attention_mask=mask, graphs=False), want)
        # a later unpadded call gets an unpadded step of its own
        plain = _prompt(batch=3, length=7)
        assert torch.equal(static_generate(offloaded, plain, 8, graphs=False),
                           original.generate(plain, max_new_tokens=8, do_sample=False, pad_token_id=0))
    assert {key.padded for key in offloaded._sida_decode_steps} == {False, True}


def test_bad_attention_masks_are_refused():
    _, offloaded = _pair("qwen3_moe", "50%")
    ids, mask = _left_padded([4, 2], 4)
    with pytest.raises(ValueError, match="left padding"):
        static_generate(offloaded, ids, 4, attention_mask=mask.flip(1), graphs=False)  # right padding
    with pytest.raises(ValueError, match="shape"):
        static_generate(offloaded, ids, 4, attention_mask=mask[:, 1:], graphs=False)
    assert torch.equal(static_generate(offloaded, ids, 4, attention_mask=torch.ones_like(ids), graphs=False),
                       static_generate(offloaded, ids, 4, graphs=False))  # all ones: the unpadded step


def test_left_padded_generate_calls_are_plain_calls():
    """model.generate routes left-padded calls to the graphed loop, with their mask; right
    padding stays with transformers."""
    from sida_moe.generate_route import plain_call

    _, offloaded = _pair("qwen3_moe", "50%")
    ids, mask = _left_padded([4, 2], 4)
    call = plain_call(offloaded, (ids,), {"attention_mask": mask, "max_new_tokens": 3, "do_sample": False})
    assert call is not None and torch.equal(call.mask, mask)
    assert plain_call(offloaded, (ids,), {"attention_mask": torch.ones_like(mask), "max_new_tokens": 3}).mask is None
    assert plain_call(offloaded, (ids,), {"attention_mask": mask.flip(1), "max_new_tokens": 3}) is None
    # on the CPU nothing is captured
    with pytest.raises(ValueError, match="sida_graphs=True, but .* CUDA"):
        offloaded.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, sida_graphs=True)


@pytest.mark.gpu
def test_left_padded_generate_uses_the_graphed_loop():
    original, offloaded = _cuda_pair()
    ids, mask = _left_padded([6, 2, 4], 6)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.inference_mode():
        got = offloaded.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
        want = original.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert [key.padded for key in offloaded._sida_decode_steps] == [True]
    assert all(step.graph is not None for step in offloaded._sida_decode_steps.values())
    # min_new_tokens in the replayed step: EOS ids masked until then, as transformers does
    eos = [int(t) for t in got[:, ids.shape[1]]]  # every row's first token
    with torch.inference_mode():
        got = offloaded.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=6, eos_token_id=eos,
                                 do_sample=False, pad_token_id=0)
        want = original.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=6, eos_token_id=eos,
                                 do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_a_decode_step_that_cannot_be_captured_runs_eagerly_with_a_warning():
    """A step doing what a capture refuses (here the last layer making a device tensor from a host
    scalar, as some transformers versions' eager attention masks do) falls back to the eager loop:
    the same tokens, and the same routing handed to the cache (the aborted capture's visits
    dropped), one warning, no capture tried again; ``sida_graphs=True`` raises instead."""
    original = tiny_model("qwen3_moe", torch.float16).cuda()

    def host_scalar(module, args, kwargs):
        torch.tensor(0.0, device=next(module.parameters()).device)  # a copy from pageable host memory

    original.model.layers[-1].register_forward_pre_hook(host_scalar, with_kwargs=True)
    offloaded, eager = (sida_moe.offload(copy.deepcopy(original), gpu_budget="25%", policy="lru", prefetch="none")
                        for _ in range(2))
    ids = _prompt(batch=2).cuda()
    with torch.inference_mode():
        want = original.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(static_generate(eager, ids, 12, pad_token_id=0, graphs=False), want)
        with pytest.warns(RuntimeWarning, match="cannot be captured"):
            got = offloaded.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(got, want)
        visits = [sida_moe.engine_of(m).stats()["routed_visits"] for m in (offloaded, eager)]
        assert visits[0] == visits[1]
        (step,) = offloaded._sida_decode_steps.values()
        assert step.graph is None and "pinned" in step.uncapturable
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # known now: no second warning
            assert torch.equal(offloaded.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0), want)
        with pytest.raises(ValueError, match="cannot capture the decode step"):
            offloaded.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, sida_graphs=True)


@pytest.mark.gpu
def test_graphed_left_padded_batch_matches_the_eager_loop():
    original, offloaded = _cuda_pair()
    ids, mask = _left_padded([6, 2, 4], 6)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.inference_mode():
        eager = static_generate(offloaded, ids, 24, attention_mask=mask, graphs=False)
        graphed = static_generate(offloaded, ids, 24, attention_mask=mask, graphs=True)
        want = original.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(eager, graphed)
    assert torch.equal(graphed, want)


def test_compiled_decode_with_the_sida_prefetcher_gives_the_uncompiled_tokens():
    # the bundled trained model and its predictor, fp32 on the host backend
    from sida_moe.predictor import load_prefetcher
    from sida_moe.presets import bundled_model_path

    path = bundled_model_path()
    model = sida_moe.from_pretrained(path, gpu_budget="25%", device="cpu", dtype=torch.float32,
                                     prefetch=load_prefetcher(path), policy="predictive")
    engine = sida_moe.engine_of(model)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = static_generate(model, ids, 10, graphs=False)
        engine.reset_stats()
        assert torch.equal(static_generate(model, ids, 10, graphs=False, compile=True), want)
    assert engine.stats()["predicted_needed"] > 0  # the predictor ran and was scored in the compiled loop
