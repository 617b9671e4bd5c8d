"""Lifecycle: pools and caches free their memory on close and on garbage collection, worker
threads are joined, and 1000 create/destroy cycles leak neither memory nor threads."""

import gc
import os
import time

import pytest

import sida_moe as sm


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def thread_count() -> int:
    """Live copy-worker threads of this process (named ``sida-copy-N`` by the runtime); other
    threads (torch's pools, predictor threads of other tests) come and go on their own."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                n += f.read().startswith("sida-copy-")
        except FileNotFoundError:  # exited between listdir and open
            pass
    return n


def settled_thread_count(expected: int) -> int:
    """Thread count once exited threads have left /proc: a joined thread's task entry can linger
    for a moment after pthread_join returns (the kernel clears the tid before reaping it)."""
    for _ in range(100):
        n = thread_count()
        if n == expected:
            return n
        time.sleep(0.01)
    return n


def one_cycle(backend, i: int, explicit_close: bool):
    pool = sm.ExpertPool(backend, [("gate_up", 48 * 1024), ("down", 16 * 1024)], [(0, e) for e in range(8)])
    pool.write(0, i % 8, "down", bytes([i % 256]) * (16 * 1024))
    cache = sm.SlotCache(pool, 4, copy_workers=2)
    cache.prefetch(0, [0, 1, 2])
    slots = cache.acquire(0, [i % 8, (i + 1) % 8])
    cache.release(slots)
    if explicit_close:
        cache.close()
        pool.close()
    # else: both are dropped by refcounting when they go out of scope


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
@pytest.mark.parametrize("kind", ["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_thousand_create_destroy_cycles(kind):
    backend = sm.Backend(kind)
    for i in range(50):  # warm up allocator arenas and lazy imports
        one_cycle(backend, i, i % 2 == 0)
    gc.collect()
    threads0, rss0 = thread_count(), rss_bytes()
    for i in range(1000):
        one_cycle(backend, i, i % 2 == 0)
        if i % 100 == 0:
            assert settled_thread_count(threads0) == threads0, f"worker threads not joined (cycle {i})"
    gc.collect()
    growth = rss_bytes() - rss0
    # A leaked pool alone would be 512 KiB per cycle (~500 MiB in all).
    assert growth < 24 << 20, f"RSS grew by {growth / 2**20:.1f} MiB over 1000 cycles"
    assert settled_thread_count(threads0) == threads0


@pytest.mark.parametrize("kind", ["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gc_of_an_open_cache_joins_workers_and_frees_the_pool(kind):
    backend = sm.Backend(kind)
    gc.collect()
    threads0 = thread_count()
    pool = sm.ExpertPool(backend, [("w", 1 << 20)], [(0, e) for e in range(32)])  # 32 MiB
    for e in range(32):  # touch every page (fresh pool memory is untouched zero pages)
        pool.write(0, e, "w", bytes([e + 1]) * (1 << 20))
    cache = sm.SlotCache(pool, 4, copy_workers=3)
    assert settled_thread_count(threads0 + 3) == threads0 + 3
    cache.prefetch(0, list(range(8)))
    rss_open = rss_bytes()
    del cache
    gc.collect()
    assert settled_thread_count(threads0) == threads0
    pool.close()  # allowed now: the cache is gone
    assert rss_bytes() < rss_open - (16 << 20)


def test_pool_outlives_its_python_handle_while_a_cache_uses_it():
    pool = sm.ExpertPool(sm.Backend("host"), [("w", 256)], [(0, 0)])
    pool.write(0, 0, "w", b"\x05" * 256)
    cache = sm.SlotCache(pool, 1)
    del pool
    gc.collect()
    slots = cache.acquire(0, [0])
    assert cache.read_slot(slots[0])[:256] == b"\x05" * 256
    cache.release(slots)
    cache.close()


def test_close_is_idempotent_and_context_managers_close():
    with sm.ExpertPool(sm.Backend("host"), [("w", 256)], [(0, 0)]) as pool:
        with sm.SlotCache(pool, 1) as cache:
            cache.release(cache.acquire(0, [0]))
        assert cache.closed
        cache.close()
    assert pool.closed
    pool.close()
