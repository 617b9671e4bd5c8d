"""Host-to-slot copy throughput through the runtime, per transfer size, against torch
``copy_(non_blocking=True)`` from pinned and from pageable memory.

Two runtime paths: ``acquire`` (demand loads issued by the calling thread on the high-priority
stream) and ``prefetch`` (the copy workers, two streams). Every round copies ``count`` experts
that are all misses (rounds alternate between two disjoint expert sets)."""

from __future__ import annotations

import pytest
import torch

import sida_moe as sm
from conftest import cuda, sync

MiB = 1 << 20
SIZES_MIB = [1, 4, 8, 16, 64]


def experts_per_round(size: int) -> int:
    budget = (512 if cuda() else 64) * MiB  # bytes copied per round
    return max(2, min(32, budget // size))


def _gbps(benchmark, nbytes: int) -> float:
    return nbytes / benchmark.stats.stats.median / 1e9


@pytest.fixture(scope="module", params=SIZES_MIB, ids=[f"{s}MiB" for s in SIZES_MIB])
def setup(request, native_backend):
    size = request.param * MiB
    count = experts_per_round(size)
    pool = sm.ExpertPool(native_backend, [("w", size)], [(l, e) for l in range(2) for e in range(count)])
    for l in range(2):
        for e in range(count):
            pool.write(l, e, "w", torch.full((size,), (l * count + e) % 251, dtype=torch.uint8))
    yield size, count, pool
    pool.close()


def _round_robin_layer():
    state = {"layer": 0}

    def next_layer() -> int:
        state["layer"] ^= 1
        return state["layer"]

    return next_layer


def test_runtime_acquire(benchmark, setup):
    size, count, pool = setup
    with sm.SlotCache(pool, count, copy_workers=0) as cache:
        next_layer = _round_robin_layer()

        def one_round():
            layer = next_layer()
            for e in range(count):
                cache.release(cache.acquire(layer, [e]))
            cache.synchronize()

        one_round()
        cache.reset_stats()
        benchmark.pedantic(one_round, rounds=15, warmup_rounds=2)
        st = cache.stats()
    benchmark.extra_info.update(
        size_mib=size // MiB, experts_per_round=count, gbps=_gbps(benchmark, size * count),
        device_timed_gbps=st["achieved_gbps"], misses=st["misses"],
    )


def test_runtime_prefetch(benchmark, setup):
    size, count, pool = setup
    with sm.SlotCache(pool, count, copy_workers=2) as cache:
        next_layer = _round_robin_layer()

        def one_round():
            layer = next_layer()
            # Demand lane: these evict the previous round's (prefetched, never used) experts.
            queued = cache.prefetch(layer, list(range(count)), priority="demand")
            cache.synchronize()
            assert queued == count

        one_round()
        cache.reset_stats()
        benchmark.pedantic(one_round, rounds=15, warmup_rounds=2)
        st = cache.stats()
    benchmark.extra_info.update(
        size_mib=size // MiB, experts_per_round=count, gbps=_gbps(benchmark, size * count),
        device_timed_gbps=st["achieved_gbps"], issued=st["prefetch_issued"],
    )


@pytest.mark.parametrize("src_kind", ["pinned", "pageable"])
def test_torch_copy(benchmark, setup, src_kind):
    size, count, _ = setup
    if src_kind == "pageable" and not cuda():
        pytest.skip("pinned vs pageable only differs with a GPU")
    dev = "cuda" if cuda() else "cpu"
    src = torch.empty(count * size, dtype=torch.uint8, pin_memory=(src_kind == "pinned" and cuda()))
    src.fill_(3)
    dst = torch.empty(count * size, dtype=torch.uint8, device=dev)

    def one_round():
        for e in range(count):
            dst[e * size : (e + 1) * size].copy_(src[e * size : (e + 1) * size], non_blocking=True)
        sync()

    one_round()
    benchmark.pedantic(one_round, rounds=15, warmup_rounds=2)
    benchmark.extra_info.update(size_mib=size // MiB, experts_per_round=count, gbps=_gbps(benchmark, size * count))
