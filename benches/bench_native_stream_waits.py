"""What an acquire costs the caller's stream (``StreamWaitProbe``): a slot whose copy
already landed vs a demand load vs a prefetch still in flight. CUDA only (on the host backend the
copies land before ``acquire`` returns: never a wait, which tests/test_native_cache.py checks).

Expected behaviour, measured here rather than asserted in tests/test_native_cache.py because whether
a copy is still in flight when its acquire looks depends on timing:

- ``landed``: the expert was prefetched and ``synchronize`` waited for its copy; its acquire records
  no wait (0 waits, 0 s: exact, and still asserted by the tests);
- ``demand``: a miss, loaded by the acquire itself (64 MiB, ~1 ms over PCIe); the copy is still in
  flight when the acquire makes the stream wait for it, so one wait is recorded, of about the copy's
  device time;
- ``prefetch_in_flight``: four prefetches queued on one copy worker, then an acquire of the last one
  (in flight, or a miss loaded now): one wait, > 0 s; after ``synchronize`` an acquire of the other
  three records nothing more (``landed_after_sync_waits`` 0).

Per round (fresh copies each round): timed waits per acquire and the wait time, in ``extra_info``
as ``wait_rate`` (fraction of rounds that recorded a wait), ``wait_ms_median/min/max`` and, for
comparison, ``copy_ms_median`` (device time of the round's copies).
"""

from __future__ import annotations

import statistics

import pytest
import torch

import sida_moe as sm
from conftest import cuda

MiB = 1 << 20
EXPERT = 64 * MiB
LAYERS, EXPERTS, SLOTS = 2, 4, 4  # a round uses one layer's experts; the next evicts them
ROUNDS = 20

pytestmark = pytest.mark.skipif(not cuda(), reason="needs CUDA (stream waits are timed on CUDA streams)")


@pytest.fixture(scope="module")
def pool(native_backend):
    p = sm.ExpertPool(native_backend, [("w", EXPERT)], [(l, e) for l in range(LAYERS) for e in range(EXPERTS)])
    yield p
    p.close()


@pytest.fixture(scope="module")
def stream():
    s = torch.cuda.Stream()
    yield s
    s.synchronize()


def _waits(c: sm.SlotCache) -> tuple[float, float]:
    return c.stats()["stream_waits"], _PROBES[id(c)].seconds()


_PROBES: dict[int, sm.StreamWaitProbe] = {}  # the open probe of each cache being measured


def _one_key(i: int) -> tuple[int, int]:
    """Round i's expert: the keys in turn, so each comes back after more than SLOTS others (evicted)."""
    return divmod(i % (LAYERS * EXPERTS), EXPERTS)


def _landed(c: sm.SlotCache, i: int, s: int) -> dict[str, float]:
    layer, expert = _one_key(i)
    c.reset_stats()
    c.prefetch(layer, [expert])
    c.synchronize()  # the copy has landed
    c.release(c.acquire(layer, [expert], s), s)  # a hit on the prefetched slot
    waits, seconds = _waits(c)
    st = c.stats()
    return {"waits": waits, "seconds": seconds, "copy_seconds": st["copy_seconds"], "misses": st["misses"]}


def _demand(c: sm.SlotCache, i: int, s: int) -> dict[str, float]:
    layer, expert = _one_key(i)
    c.reset_stats()
    c.release(c.acquire(layer, [expert], s), s)  # a miss: the acquire issues the copy itself
    waits, seconds = _waits(c)
    c.synchronize()
    st = c.stats()
    return {"waits": waits, "seconds": seconds, "copy_seconds": st["copy_seconds"], "misses": st["misses"]}


def _prefetch_in_flight(c: sm.SlotCache, i: int, s: int) -> dict[str, float]:
    layer = i % LAYERS  # all of the other layer's experts: none resident
    c.reset_stats()
    c.prefetch(layer, list(range(EXPERTS)))  # queued on the one copy worker
    c.release(c.acquire(layer, [EXPERTS - 1], s), s)  # the last one queued
    waits, seconds = _waits(c)
    c.synchronize()
    c.release(c.acquire(layer, list(range(EXPERTS - 1)), s), s)  # landed: nothing more recorded
    after_waits, after_seconds = _waits(c)
    st = c.stats()
    return {
        "waits": waits, "seconds": seconds, "copy_seconds": st["copy_seconds"], "misses": st["misses"],
        "landed_after_sync_waits": after_waits - waits, "landed_after_sync_seconds": after_seconds - seconds,
    }


SCENARIOS = {"landed": (_landed, 0), "demand": (_demand, 0), "prefetch_in_flight": (_prefetch_in_flight, 1)}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_stream_wait_per_acquire(benchmark, pool, stream, scenario):
    run, copy_workers = SCENARIOS[scenario]
    s = stream.cuda_stream
    rows: list[dict[str, float]] = []
    with sm.SlotCache(pool, SLOTS, copy_workers=copy_workers) as c, sm.StreamWaitProbe(c) as probe:
        _PROBES[id(c)] = probe
        count = [0]

        def one_round():
            rows.append(run(c, count[0], s))
            count[0] += 1

        one_round()  # warm-up
        rows.clear()
        benchmark.pedantic(one_round, rounds=ROUNDS)
        del _PROBES[id(c)]
    stream.synchronize()
    waits = [r["waits"] for r in rows]
    wait_ms = [1e3 * r["seconds"] for r in rows]
    # what the cache guarantees of the measured seconds (moved from tests/test_native_cache.py):
    # never negative, and none without a timed wait
    assert all(r["seconds"] >= 0.0 and (r["waits"] > 0 or r["seconds"] == 0.0) for r in rows), rows
    info = {
        "scenario": scenario, "expert_mib": EXPERT // MiB, "rounds": len(rows),
        "expected": "no wait" if scenario == "landed" else "one wait per acquire, > 0 ms",
        "waits_per_acquire_mean": statistics.fmean(waits),
        "wait_rate": sum(w > 0 for w in waits) / len(rows),
        "wait_ms_median": statistics.median(wait_ms), "wait_ms_min": min(wait_ms), "wait_ms_max": max(wait_ms),
        "copy_ms_median": statistics.median(1e3 * r["copy_seconds"] for r in rows),
        "misses_per_round_mean": statistics.fmean(r["misses"] for r in rows),
    }
    if scenario == "prefetch_in_flight":
        info["landed_after_sync_waits"] = sum(r["landed_after_sync_waits"] for r in rows)
        info["landed_after_sync_ms_max"] = max(1e3 * r["landed_after_sync_seconds"] for r in rows)
    benchmark.extra_info.update(info)
