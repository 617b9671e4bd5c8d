"""The policies alone on a recorded visit sequence (``sida_moe.bench.policy_replay``): the cache's
own code replayed from cold, counting only the visits from ``count_from``."""

import random

import pytest

import sida_moe
from sida_moe.bench.policy_replay import replay_visits
from sida_moe.visit_trace import VisitTrace

KEYS = [(layer, e) for layer in range(3) for e in range(8)]


def _visits(steps) -> VisitTrace:
    trace = VisitTrace()
    for layer, experts, table in steps:
        trace.add(layer, experts, table)
    return trace


def _trace(seed: int, table: bool | None) -> VisitTrace:
    """60 visits walking 3 layers, 2-3 of 8 experts each, skewed; ``table`` None: mixed paths."""
    rng = random.Random(seed)
    trace = VisitTrace()
    for i in range(60):
        experts = sorted(set(rng.choices(range(8), weights=[8, 6, 4, 3, 2, 1, 1, 1], k=3)))
        trace.add(i % 3, experts, rng.random() < 0.5 if table is None else table)
    return trace


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "predictive"])
@pytest.mark.parametrize("table", [False, True])
def test_a_replay_counts_what_the_simulator_of_the_same_path_counts(policy, table):
    trace = _trace(1, table)
    future = policy == "predictive"
    sim = sida_moe.simulate_policy(policy, 5, list(trace), future=future, path="table" if table else "acquire")
    assert replay_visits(KEYS, 5, policy, trace, future=future) == (sim["hits"], sim["misses"])


def test_count_from_counts_only_the_visits_after_it_of_one_replay_from_cold():
    trace = _trace(2, None)
    assert sum(trace.through_table) not in (0, len(trace))  # both paths
    full = replay_visits(KEYS, 4, "lru", trace, future=False)
    prefix = VisitTrace()
    for (layer, experts), table in zip(trace[:25], trace.through_table[:25]):
        prefix.add(layer, experts, table)
    head = replay_visits(KEYS, 4, "lru", prefix, future=False)
    tail = replay_visits(KEYS, 4, "lru", trace, future=False, count_from=25)
    assert tail == (full[0] - head[0], full[1] - head[1]) and tail[0] + tail[1] > 0
    assert replay_visits(KEYS, 4, "lru", trace, future=False, count_from=len(trace)) == (0, 0)
    for bad in (-1, len(trace) + 1):
        with pytest.raises(ValueError, match=r"count_from must be in \[0, 60\]"):
            replay_visits(KEYS, 4, "lru", trace, future=False, count_from=bad)


def test_belady_fed_the_trace_is_at_least_every_policy_on_acquires():
    trace = _trace(3, False)
    belady = replay_visits(KEYS, 4, "predictive", trace, future=True)[0]
    for policy in ("lru", "lfu", "fifo"):
        assert belady >= replay_visits(KEYS, 4, policy, trace, future=False)[0], policy


def test_the_engine_records_which_path_each_visit_took():
    import torch

    from sida_moe.presets import build_offloaded

    model = build_offloaded("qwen3-moe-tiny", gpu_budget=0.5, device="cpu", prefetch="none")
    engine = sida_moe.engine_of(model)
    first = engine.layers[0]
    long = next(t for t in range(1, 4096) if not engine.uses_table(first.ordinal, t))
    ids = torch.randint(0, model.config.vocab_size, (1, long))
    with torch.inference_mode(), engine.recording_acquires() as trace:
        model(input_ids=ids)  # a prompt past the table's reach: acquires
        model(input_ids=ids[:, :1])  # one token: through the expert table
    layers = len(engine.layers)
    assert len(trace) >= 2 * layers and len(trace.through_table) == len(trace)
    assert trace.through_table[-layers:] == [True] * layers
    assert not any(trace.through_table[:layers])


def test_a_table_visit_counts_its_hits_before_its_misses_evict():
    """Decode layers hand a visit over whole: its hits stay, its admitted misses then load (an
    acquire would need every expert resident at once)."""
    keys = [(0, e) for e in range(4)]
    table = [(0, [0, 1, 2, 3], True), (0, [0, 1], True)]
    # 3 slots: 0, 1, 2 take the free ones; 3, used no more than they were, evicts none of them
    assert replay_visits(keys, 3, "lru", _visits(table), future=False) == (2, 4)
    assert replay_visits(keys, 4, "lru", _visits([(0, [0, 1, 2, 3], False), (0, [3, 1], False)]), future=False) == (2, 4)


def test_belady_is_the_best_policy_on_a_random_layer_walk():
    rng = random.Random(0)
    keys = [(l, e) for l in range(4) for e in range(8)]
    steps = _visits([(l, rng.sample(range(8), rng.randint(1, 5)), True) for _ in range(30) for l in range(4)])
    for slots in (4, 9, 20):
        best = replay_visits(keys, slots, "predictive", steps, future=True)[0]
        for policy in ("lru", "fifo", "lfu"):
            assert best >= replay_visits(keys, slots, policy, steps, future=False)[0], (slots, policy)
