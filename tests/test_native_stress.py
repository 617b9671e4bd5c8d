"""Concurrency stress: many Python threads acquire, release and prefetch while the copy workers
run. No request is lost or served twice, no slot is handed to two experts at once, and the bytes
in every acquired slot equal the source expert's bytes."""

import random
import threading
import time

import numpy as np
import pytest
import torch

import sida_moe as sm

LAYERS, EXPERTS, NBYTES, SLOTS = 3, 16, 4096, 12
DURATION_S = 2.0


def expert_bytes(layer: int, expert: int) -> bytes:
    return np.random.default_rng(layer * 1000 + expert).integers(0, 256, NBYTES, dtype=np.uint8).tobytes()


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["lru", "predictive"])
@pytest.mark.parametrize("kind", ["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_threads_acquire_release_prefetch(kind, policy):
    backend = sm.Backend(kind)
    keys = [(l, e) for l in range(LAYERS) for e in range(EXPERTS)]
    expected = {k: expert_bytes(*k) for k in keys}
    pool = sm.ExpertPool(backend, [("w", NBYTES)], keys)
    for k in keys:
        pool.write(*k, "w", expected[k])
    # Host: slots in a torch tensor, read through a view (no copy through the runtime).
    mem = torch.zeros(SLOTS * pool.expert_nbytes, dtype=torch.uint8) if kind == "host" else None
    cache = sm.SlotCache(
        pool, SLOTS, policy=policy, copy_workers=2, queue_capacity=64,
        slots_ptr=None if mem is None else mem.data_ptr(),
    )

    def slot_bytes(slot: int) -> bytes:
        if mem is None:
            return cache.read_slot(slot)[:NBYTES]
        base = slot * cache.slot_nbytes
        return mem[base : base + NBYTES].numpy().tobytes()

    lock = threading.Lock()
    holders: dict[int, list] = {}  # slot -> [key, pins] for slots held by test threads right now
    failures: list[str] = []
    counts = {"acquires": 0, "releases": 0, "queued": 0}
    deadline = time.monotonic() + DURATION_S

    def acquirer(seed: int):
        rng = random.Random(seed)
        n_acq = 0
        try:
            while time.monotonic() < deadline:
                layer = rng.randrange(LAYERS)
                experts = rng.sample(range(EXPERTS), rng.randint(1, 4))
                if rng.random() < 0.2:
                    experts.append(experts[0])  # duplicates are allowed
                slots = cache.acquire(layer, experts)
                n_acq += 1
                with lock:
                    for s, e in zip(slots, experts):
                        h = holders.setdefault(s, [(layer, e), 0])
                        if h[1] > 0 and h[0] != (layer, e):
                            failures.append(f"slot {s} held for {h[0]} and {(layer, e)} at once")
                        h[0] = (layer, e)
                        h[1] += 1
                by_expert = dict(zip(experts, slots))
                if len(set(by_expert.values())) != len(by_expert):
                    failures.append(f"two experts in one slot: {by_expert}")
                for e, s in by_expert.items():
                    if slot_bytes(s) != expected[(layer, e)]:
                        failures.append(f"slot {s} does not hold expert {(layer, e)}")
                with lock:  # drop our record before the runtime may hand the slot to another
                    for s in slots:
                        holders[s][1] -= 1
                cache.release(slots)
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(f"acquirer {seed}: {exc!r}")
        with lock:
            counts["acquires"] += n_acq
            counts["releases"] += n_acq

    def prefetcher(seed: int):
        rng = random.Random(seed)
        queued, generation = 0, 0
        try:
            while time.monotonic() < deadline:
                generation += 1
                layer = rng.randrange(LAYERS)
                prio = "demand" if rng.random() < 0.3 else "prefetch"
                queued += cache.prefetch(layer, rng.sample(range(EXPERTS), 4), priority=prio, generation=generation)
                if generation % 7 == 0:
                    cache.cancel_before(generation - 2)
                if policy == "predictive" and generation % 5 == 0:
                    cache.set_future([(rng.randrange(LAYERS), rng.sample(range(EXPERTS), 3)) for _ in range(4)])
        except Exception as exc:  # noqa: BLE001
            failures.append(f"prefetcher {seed}: {exc!r}")
        with lock:
            counts["queued"] += queued

    threads = [threading.Thread(target=acquirer, args=(i,)) for i in range(6)]
    threads += [threading.Thread(target=prefetcher, args=(100 + i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not failures, failures[:5]

    cache.synchronize()
    s = cache.stats()
    assert counts["acquires"] > 100
    assert s["acquires"] == counts["acquires"] and s["releases"] == counts["releases"]
    assert s["prefetch_queued"] == counts["queued"]
    # Every queued request was handled exactly once, one way or another.
    handled = (
        s["prefetch_issued"] + s["prefetch_cancelled"] + s["prefetch_redundant"]
        + s["prefetch_dropped"] - s["prefetch_queue_full"] + s["load_errors"]
    )
    assert handled == counts["queued"], s
    assert s["load_errors"] == 0 and s["queue_len"] == 0
    states = cache.slot_states()
    assert all(rc == 0 for _, rc, _ in states)
    resident = cache.resident()
    assert len(set(resident.values())) == len(resident) <= SLOTS
    for k, slot in resident.items():
        assert states[slot][2] == k and slot_bytes(slot) == expected[k]
    cache.close()
    pool.close()
