"""The policies alone on a recorded visit sequence (``sida_moe.bench.policy_replay`` over
``simulate_policy`` with a path per visit and ``count_from``): what a cold host-backend SlotCache
driven by the same visits counts, only the visits from ``count_from`` counted."""

import random

import pytest

from sida_moe.visit_trace import VisitRecorder
import sida_moe
from sida_moe.bench.policy_replay import policy_hit_rates
from sida_moe.visit_trace import VisitTrace

KEYS = [(layer, e) for layer in range(4) for e in range(8)]


def _visits(steps) -> VisitTrace:
    trace = VisitTrace()
    for layer, experts, table in steps:
        trace.add(layer, experts, table)
    return trace


def _trace(seed: int, table: bool | None) -> VisitTrace:
    """60 visits walking 3 layers, 1-3 of 8 experts each, skewed; ``table`` None: mixed paths."""
    rng = random.Random(seed)
    return _visits((i % 3, sorted(set(rng.choices(range(8), weights=[8, 6, 4, 3, 2, 1, 1, 1], k=3))),
                    rng.random() < 0.5 if table is None else table) for i in range(60))


def _simulated(slots, policy, trace, future, count_from=0):
    c = sida_moe.simulate_policy(policy, slots, list(trace), future=future,
                                 path=["table" if t else "acquire" for t in trace.through_table], count_from=count_from)
    return c["hits"], c["misses"]


def _slot_cache(slots, policy, trace, future):
    """(hits, misses) of a host-backend SlotCache fed the visits one by one: table visits as decode
    layers hand them over (the admitted misses' loads done before the next visit), the others
    acquired and released."""
    pool = sida_moe.ExpertPool(sida_moe.Backend("host"), [("w", 1)], KEYS)
    cache = sida_moe.SlotCache(pool, slots, policy, copy_workers=0)
    try:
        if future:
            cache.set_future(list(trace))
        for (layer, experts), table in zip(trace, trace.through_table):
            if table:
                cache.note_routed(layer, experts)
                cache.synchronize()
            else:
                cache.release(cache.acquire(layer, experts))
        s = cache.stats()
        return int(s["hits"]), int(s["misses"])
    finally:
        cache.close()
        pool.close()


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "predictive"])
@pytest.mark.parametrize("table", [False, True, None])
def test_the_simulation_counts_what_the_slot_cache_counts_on_each_visits_path(policy, table):
    trace = _trace(1, table)
    future = policy == "predictive"
    assert _simulated(5, policy, trace, future) == _slot_cache(5, policy, trace, future)


def test_count_from_counts_only_the_visits_after_it_of_one_run_from_cold():
    trace = _trace(2, None)
    assert sum(trace.through_table) not in (0, len(trace))  # both paths
    full = _simulated(4, "lru", trace, False)
    head = _simulated(4, "lru", _visits((l, e, t) for (l, e), t in zip(trace[:25], trace.through_table[:25])), False)
    tail = _simulated(4, "lru", trace, False, count_from=25)
    assert tail == (full[0] - head[0], full[1] - head[1]) and tail[0] + tail[1] > 0
    assert _simulated(4, "lru", trace, False, count_from=len(trace)) == (0, 0)
    for bad in (-1, len(trace) + 1):
        with pytest.raises(ValueError, match=r"count_from must be in \[0, 60\]"):
            _simulated(4, "lru", trace, False, count_from=bad)
    with pytest.raises(ValueError, match="one path for every visit or one per visit: 2 paths for 60 visits"):
        sida_moe.simulate_policy("lru", 4, list(trace), path=["table", "acquire"])
    with pytest.raises(TypeError, match="path must be"):
        sida_moe.simulate_policy("lru", 4, list(trace), path=3)


def test_policy_hit_rates_names_belady_and_leaves_an_empty_part_empty():
    trace = _trace(3, None)
    rates = policy_hit_rates(4, trace, ("belady", "lru", "fifo"), count_from=10)
    hits, misses = _simulated(4, "predictive", trace, True, count_from=10)
    assert rates["belady"] == hits / (hits + misses)
    assert rates["belady"] >= rates["lru"] and rates["belady"] >= rates["fifo"]
    assert policy_hit_rates(4, trace, ("lru",), count_from=len(trace)) == {"lru": None}


def test_belady_fed_the_trace_is_at_least_every_policy_on_acquires():
    trace = _trace(3, False)
    belady = _simulated(4, "predictive", trace, True)[0]
    for policy in ("lru", "lfu", "fifo"):
        assert belady >= _simulated(4, policy, trace, False)[0], policy


def test_the_engine_records_which_path_each_visit_took():
    import torch

    from sida_moe.preset_models import build_offloaded

    model = build_offloaded("qwen3-moe-tiny", gpu_budget=0.5, device="cpu", prefetch="none")
    engine = sida_moe.engine_of(model)
    first = engine.layers[0]
    long = next(t for t in range(1, 4096) if not engine.uses_table(first.ordinal, t))
    ids = torch.randint(0, model.config.vocab_size, (1, long))
    with torch.inference_mode(), engine.observe(VisitRecorder()) as recorder:
        trace = recorder.trace
        model(input_ids=ids)  # a prompt past the table's reach: acquires
        model(input_ids=ids[:, :1])  # one token: through the expert table
    layers = len(engine.layers)
    assert len(trace) >= 2 * layers and len(trace.through_table) == len(trace)
    assert trace.through_table[-layers:] == [True] * layers
    assert not any(trace.through_table[:layers])


def test_a_table_visit_counts_its_hits_before_its_misses_evict():
    """Decode layers hand a visit over whole: its hits stay, its admitted misses then load (an
    acquire would need every expert resident at once)."""
    table = _visits([(0, [0, 1, 2, 3], True), (0, [0, 1], True)])
    # 3 slots: 0, 1, 2 take the free ones; 3, used no more than they were, evicts none of them
    assert _simulated(3, "lru", table, False) == (2, 4)
    assert _simulated(4, "lru", _visits([(0, [0, 1, 2, 3], False), (0, [3, 1], False)]), False) == (2, 4)


def test_belady_is_the_best_policy_on_a_random_layer_walk():
    rng = random.Random(0)
    steps = _visits([(l, rng.sample(range(8), rng.randint(1, 5)), True) for _ in range(30) for l in range(4)])
    for slots in (4, 9, 20):
        best = _simulated(slots, "predictive", steps, True)[0]
        for policy in ("lru", "fifo", "lfu"):
            assert best >= _simulated(slots, policy, steps, False)[0], (slots, policy)
