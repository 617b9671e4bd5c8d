"""Prefetch-queue operations per second under contention, and eviction decision latency."""

from __future__ import annotations

import random
import threading
import time

import pytest

import sida_moe as sm

THREADS = 4
PER_THREAD = 4000
BATCH = 8


@pytest.fixture(scope="module")
def tiny_pool():
    pool = sm.ExpertPool(sm.Backend("host"), [("w", 256)], [(l, e) for l in range(64) for e in range(128)])
    yield pool
    pool.close()


def test_queue_ops_under_contention(benchmark, tiny_pool):
    """THREADS Python threads push BATCH requests per call while 2 workers pop them; every request
    is stale (cancelled), so what is measured is push + pop + the cancellation check."""
    cache = sm.SlotCache(tiny_pool, 8, copy_workers=2, queue_capacity=1 << 16)

    def producer(t: int):
        for i in range(PER_THREAD):
            cache.prefetch((t * 7 + i) % 64, [(i * BATCH + j) % 128 for j in range(BATCH)], generation=0)

    def one_round():
        cache.cancel_before(1)
        threads = [threading.Thread(target=producer, args=(t,)) for t in range(THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        cache.synchronize()

    benchmark.pedantic(one_round, rounds=5, warmup_rounds=1)
    st = cache.stats()
    cache.close()
    ops = THREADS * PER_THREAD * BATCH
    benchmark.extra_info.update(
        requests_per_round=ops, requests_per_s=ops / benchmark.stats.stats.median,
        calls_per_s=THREADS * PER_THREAD / benchmark.stats.stats.median,
        cancelled=st["prefetch_cancelled"], queue_full=st["prefetch_queue_full"],
    )


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "predictive"])
@pytest.mark.parametrize("slots", [64, 1024])
def test_eviction_decision_latency(benchmark, policy, slots):
    """simulate_policy over an all-miss-heavy trace: time per decision (no copies at all)."""
    rng = random.Random(0)
    steps = 20000
    trace = [(0, [rng.randrange(4 * slots)]) for _ in range(steps)]
    result = {}

    def run():
        result.update(sm.simulate_policy(policy, slots, trace, future=True))

    benchmark.pedantic(run, rounds=3)
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(
        steps=steps, evictions=result["evictions"], us_per_step=t / steps * 1e6,
        us_per_eviction=t / max(result["evictions"], 1) * 1e6,
    )


@pytest.mark.parametrize("slots", [64, 1024])
def test_acquire_release_latency_all_misses(benchmark, tiny_pool, slots):
    """One acquire (a miss: eviction decision + 256-byte host copy) + release through SlotCache."""
    cache = sm.SlotCache(tiny_pool, slots, copy_workers=0)
    keys = [(l, e) for l in range(64) for e in range(128)]
    rng = random.Random(1)
    order = [keys[rng.randrange(len(keys))] for _ in range(5000)]
    for l, e in order[:slots]:
        cache.release(cache.acquire(l, [e]))

    def run():
        for l, e in order:
            cache.release(cache.acquire(l, [e]))

    benchmark.pedantic(run, rounds=3)
    st = cache.stats()
    cache.close()
    benchmark.extra_info.update(us_per_acquire_release=benchmark.stats.stats.median / len(order) * 1e6,
                                miss_rate=st["misses"] / max(st["hits"] + st["misses"], 1))
