"""SlotCache behaviour: acquire/release, prefetch lanes, cancellation, stats, caller-owned slot
memory, and every kind of bad input raising a clear exception with the state left intact."""

import threading
import time

import pytest
import torch

import sida_moe as sm
from sida_moe._native import InvalidArgumentError

NBYTES = 1000  # deliberately not a multiple of 256


def expert_bytes(layer: int, expert: int) -> bytes:
    return bytes((layer * 7 + expert * 13 + i) % 256 for i in range(NBYTES))


@pytest.fixture(params=["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request):
    return sm.Backend(request.param)


@pytest.fixture
def pool(backend):
    keys = [(l, e) for l in range(2) for e in range(8)]
    p = sm.ExpertPool(backend, [("w", NBYTES)], keys)
    for l, e in keys:
        p.write(l, e, "w", expert_bytes(l, e))
    yield p
    p.close()


def slot_payload(cache, slot):
    return cache.read_slot(slot)[:NBYTES]


def test_properties(pool, backend):
    with sm.SlotCache(pool, 3, policy="fifo") as c:
        assert c.num_slots == 3 and c.slot_nbytes == pool.expert_nbytes == 1024
        assert c.policy == "fifo" and c.backend_kind == backend.kind
        assert c.slots_ptr != 0 and not c.closed
        assert c.slot_states() == [("free", 0, None)] * 3
    assert c.closed


def test_acquire_loads_bytes_and_duplicates_share_a_slot(pool):
    with sm.SlotCache(pool, 4) as c:
        slots = c.acquire(1, [3, 5, 3])
        assert slots[0] == slots[2] and slots[0] != slots[1]
        assert slot_payload(c, slots[0]) == expert_bytes(1, 3)
        assert slot_payload(c, slots[1]) == expert_bytes(1, 5)
        st = c.slot_states()
        assert st[slots[0]] == ("ready", 2, (1, 3))  # pinned once per returned entry
        assert c.lookup(1, 3) == slots[0] and c.lookup(1, 4) is None and c.lookup(-1, 0) is None
        assert c.resident() == {(1, 3): slots[0], (1, 5): slots[1]}
        c.release(slots)  # one release per acquired entry: slot of expert 3 twice
        assert all(rc == 0 for _, rc, _ in c.slot_states())
        s = c.stats()
        assert (s["acquires"], s["misses"], s["hits"], s["releases"]) == (1, 2, 0, 1)
        assert s["bytes_copied"] == 2 * c.slot_nbytes
        c.release(c.acquire(1, [3]))
        assert c.stats()["hits"] == 1


def test_prefetch_then_acquire_counts_used_and_wasted(pool):
    with sm.SlotCache(pool, 2, copy_workers=0) as c:
        assert c.prefetch(0, [1, 2]) == 2
        c.synchronize()
        assert c.prefetch(0, [1, 2]) == 0  # already resident: nothing queued
        s = c.stats()
        assert s["prefetch_issued"] == 2 and s["prefetch_queued"] == 2
        slots = c.acquire(0, [1])
        assert slot_payload(c, slots[0]) == expert_bytes(0, 1)
        # A demand load may evict the prefetched-but-unused expert 2.
        slots2 = c.acquire(0, [3])
        s = c.stats()
        assert (s["hits"], s["misses"], s["prefetch_used"], s["prefetch_wasted"], s["evictions"]) == (1, 1, 1, 1, 1)
        c.release(slots + slots2)


def test_speculative_prefetch_never_evicts_unused_prefetches(pool):
    with sm.SlotCache(pool, 2, copy_workers=0) as c:
        c.prefetch(0, [1, 2])
        c.synchronize()
        c.prefetch(0, [3])
        c.synchronize()
        s = c.stats()
        assert s["prefetch_dropped"] == 1 and s["prefetch_queue_full"] == 0
        assert set(c.resident()) == {(0, 1), (0, 2)}
        # The demand lane may evict them.
        c.prefetch(0, [3], priority="demand")
        c.synchronize()
        assert (0, 3) in c.resident()
        assert c.stats()["prefetch_wasted"] == 1


def test_cancel_before_discards_stale_generations(pool):
    with sm.SlotCache(pool, 8, copy_workers=0) as c:
        assert c.prefetch(0, [0, 1, 2], generation=1) == 3
        assert c.prefetch(1, [0, 1], generation=2) == 2
        c.cancel_before(2)
        c.synchronize()
        s = c.stats()
        assert s["prefetch_cancelled"] == 3 and s["prefetch_issued"] == 2
        assert set(c.resident()) == {(1, 0), (1, 1)}


def test_full_queue_drops_and_counts(pool):
    with sm.SlotCache(pool, 8, copy_workers=0, queue_capacity=2) as c:
        assert c.prefetch(0, [0, 1, 2, 3]) == 2
        assert c.prefetch(0, [4], priority="demand") == 1  # the demand lane has its own room
        s = c.stats()
        assert s["prefetch_dropped"] == 2 and s["prefetch_queue_full"] == 2 and s["queue_len"] == 3
        c.synchronize()
        assert c.stats()["prefetch_issued"] == 3


def test_demand_lane_is_served_first(pool):
    with sm.SlotCache(pool, 1, copy_workers=0) as c:
        c.prefetch(0, [1])
        c.prefetch(0, [2], priority="demand")
        c.synchronize()
        # Demand (0, 2) was loaded first; the speculative (0, 1) then found no evictable slot.
        assert set(c.resident()) == {(0, 2)}


def test_workers_serve_the_queue(pool):
    with sm.SlotCache(pool, 16, copy_workers=3) as c:
        assert c.prefetch(0, list(range(8))) == 8
        assert c.prefetch(1, list(range(8)), priority="demand") == 8
        c.synchronize()
        assert len(c.resident()) == 16 and c.stats()["prefetch_issued"] == 16
        for (l, e), s in c.resident().items():
            assert slot_payload(c, s) == expert_bytes(l, e)


def test_predictive_set_future_offset(pool):
    with sm.SlotCache(pool, 2, policy="predictive", copy_workers=0) as c:
        c.release(c.acquire(0, [0, 1]))
        # Call now+1 wants 0; call now+0 is unknown: loading 2 must evict 1.
        c.set_future([(0, [0])], offset=1)
        c.release(c.acquire(0, [2]))
        assert set(c.resident()) == {(0, 0), (0, 2)}


def test_reset_stats(pool):
    with sm.SlotCache(pool, 2) as c:
        c.release(c.acquire(0, [1]))
        c.reset_stats()
        assert all(v == 0 for k, v in c.stats().items() if k != "num_slots")


def test_caller_owned_slot_memory_is_written(pool, backend):
    dev = "cuda" if backend.kind == "cuda" else "cpu"
    mem = torch.zeros(3 * pool.expert_nbytes, dtype=torch.uint8, device=dev)
    with sm.SlotCache(pool, 3, slots_ptr=mem.data_ptr()) as c:
        assert c.slots_ptr == mem.data_ptr()
        slots = c.acquire(0, [6, 7], stream=torch.cuda.current_stream().cuda_stream if dev == "cuda" else 0)
        for s, e in zip(slots, [6, 7]):
            view = mem[s * c.slot_nbytes : s * c.slot_nbytes + NBYTES]
            assert bytes(view.cpu().numpy()) == expert_bytes(0, e)
        c.release(slots)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("n", [0, -3])
def test_bad_budget(pool, n):
    with pytest.raises(sm.BudgetError, match="num_slots"):
        sm.SlotCache(pool, n)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"policy": "mru"},
        {"copy_workers": -1},
        {"copy_workers": 65},
        {"queue_capacity": 0},
        {"slots_ptr": 0},
        {"slots_ptr": -8},
        {"slots_ptr": 4097},
        {"acquire_timeout": 0.0},
        {"acquire_timeout": float("nan")},
        {"acquire_timeout": 1e300},
    ],
)
def test_bad_constructor_arguments(pool, kwargs):
    with pytest.raises(InvalidArgumentError):
        sm.SlotCache(pool, 2, **kwargs)


def test_budget_below_the_request_pins_nothing(pool):
    with sm.SlotCache(pool, 3) as c:
        held = c.acquire(0, [0])
        with pytest.raises(sm.BudgetError, match="exceeds"):
            c.acquire(0, [1, 2, 3, 4])
        assert c.slot_states()[held[0]] == ("ready", 1, (0, 0))
        assert sum(rc for _, rc, _ in c.slot_states()) == 1
        c.release(held)


def test_no_evictable_slot_times_out_with_budget_error(pool):
    with sm.SlotCache(pool, 2, acquire_timeout=0.2) as c:
        held = c.acquire(0, [0, 1])
        with pytest.raises(sm.BudgetError, match="pinned"):
            c.acquire(0, [2])
        assert sum(rc for _, rc, _ in c.slot_states()) == 2
        c.release(held)
        c.release(c.acquire(0, [2]))


def test_acquire_waits_for_a_release_by_another_thread(pool):
    with sm.SlotCache(pool, 2) as c:
        held = c.acquire(0, [0, 1])
        t = threading.Timer(0.1, c.release, args=(held,))
        t.start()
        slots = c.acquire(0, [2])
        t.join()
        assert slot_payload(c, slots[0]) == expert_bytes(0, 2)
        c.release(slots)


@pytest.mark.parametrize("layer, experts", [(0, [8]), (2, [0]), (-1, [0]), (0, [-1]), (0, [0, 99])])
def test_unknown_expert_pins_nothing(pool, layer, experts):
    with sm.SlotCache(pool, 4) as c:
        with pytest.raises(sm.UnknownExpertError):
            c.acquire(layer, experts)
        with pytest.raises(sm.UnknownExpertError):
            c.prefetch(layer, experts)
        with pytest.raises(sm.UnknownExpertError):
            c.set_future([(layer, experts)])
        assert c.slot_states() == [("free", 0, None)] * 4
        assert c.stats()["acquires"] == 0


def test_release_errors_leave_state_intact(pool):
    with sm.SlotCache(pool, 3) as c:
        slots = c.acquire(0, [1, 2])
        c.release([slots[0]])
        with pytest.raises(sm.SlotStateError, match="double release"):
            c.release([slots[0]])
        with pytest.raises(sm.SlotStateError):
            c.release([slots[1], slots[1]])  # pinned once, released twice: nothing released
        with pytest.raises(InvalidArgumentError, match="out of range"):
            c.release([3])
        with pytest.raises(InvalidArgumentError):
            c.release([-1])
        assert c.slot_states()[slots[1]][1] == 1
        with pytest.raises(InvalidArgumentError):
            c.release([slots[1]], stream=-1)
        c.release([slots[1]])
        with pytest.raises(InvalidArgumentError):
            c.read_slot(3)


def test_bad_prefetch_arguments(pool):
    with sm.SlotCache(pool, 2) as c:
        with pytest.raises(InvalidArgumentError, match="priority"):
            c.prefetch(0, [1], priority="urgent")
        with pytest.raises(InvalidArgumentError):
            c.prefetch(0, [1], generation=-1)
        with pytest.raises(InvalidArgumentError):
            c.cancel_before(-1)
        with pytest.raises(InvalidArgumentError):
            c.set_future([(0, [1])], offset=-1)
        assert c.stats()["prefetch_queued"] == 0


def test_use_after_close(pool):
    c = sm.SlotCache(pool, 2)
    slots = c.acquire(0, [1])
    with pytest.raises(sm.SlotStateError, match="SlotCache"):
        pool.close()  # the cache still uses the pool
    c.close()
    c.close()  # idempotent
    for call in (
        lambda: c.acquire(0, [1]),
        lambda: c.release(slots),
        lambda: c.prefetch(0, [1]),
        lambda: c.cancel_before(1),
        lambda: c.set_future([]),
        lambda: c.resident(),
        lambda: c.lookup(0, 1),
        lambda: c.slot_states(),
        lambda: c.read_slot(0),
        lambda: c.synchronize(),
    ):
        with pytest.raises(sm.ClosedError):
            call()
    assert isinstance(c.stats(), dict)
    pool.close()
    with pytest.raises(sm.ClosedError):
        sm.SlotCache(pool, 2)


def test_close_wakes_an_acquire_waiting_for_room(pool):
    c = sm.SlotCache(pool, 1)
    held = c.acquire(0, [0])
    errors = []

    def waiter():
        try:
            c.acquire(0, [1])
        except sm.ClosedError as e:
            errors.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.1)
    c.close()
    t.join(5)
    assert not t.is_alive() and len(errors) == 1
    del held


def test_exception_hierarchy():
    assert issubclass(sm.BudgetError, ValueError) and issubclass(sm.BudgetError, sm.SidaMoeError)
    assert issubclass(sm.UnknownExpertError, KeyError)
    assert issubclass(sm.SlotStateError, RuntimeError) and issubclass(sm.ClosedError, RuntimeError)
    assert issubclass(sm.CudaError, RuntimeError)
    assert issubclass(InvalidArgumentError, ValueError) and issubclass(InvalidArgumentError, sm.SidaMoeError)
    assert sm.BudgetError.__module__ == "sida_moe._native"


def test_int_sequences_may_be_arrays_or_tensors(pool):
    import numpy as np

    with sm.SlotCache(pool, 4) as c:
        for experts in (np.array([1, 2]), torch.tensor([1, 3]), (1, 2), range(2), [np.int64(5)]):
            slots = c.acquire(0, experts)
            assert len(slots) == len(list(experts))
            c.release(torch.tensor(slots))
        assert c.prefetch(1, np.array([6, 7])) == 2
        c.set_future([(0, torch.tensor([1, 2])), (1, np.array([3]))])
        for bad in ("ab", [1.5], 3, None, torch.tensor(3)):
            with pytest.raises(TypeError, match="experts"):
                c.acquire(0, bad)
        with pytest.raises(TypeError, match="visits"):
            c.set_future([1, 2])
        assert all(rc == 0 for _, rc, _ in c.slot_states())
    assert sm.simulate_policy("lru", 2, [(0, np.array([1, 2]))])["misses"] == 2


# ----------------------------------------------------------------------------- stream waits
def _stream(backend):
    return torch.cuda.current_stream().cuda_stream if backend.kind == "cuda" else 0


def test_a_stream_wait_probe_times_while_open_and_reset_zeroes_it(pool, backend):
    with sm.SlotCache(pool, 4, copy_workers=0) as c:
        with sm.StreamWaitProbe(c) as probe:
            assert not probe.closed
            assert probe.seconds() == 0.0 and c.stats()["stream_waits"] == 0
            for _ in range(2):  # misses, then hits
                c.release(c.acquire(0, [1, 2, 3], _stream(backend)), _stream(backend))
            waited = probe.seconds()
            assert isinstance(waited, float)  # its value: benches/bench_native_stream_waits.py
            assert c.stats()["stream_waits"] <= c.stats()["acquires"] == 2  # at most one timed wait per acquire
            if backend.kind == "host":  # copies land before acquire returns: never a wait
                assert waited == 0.0 and c.stats()["stream_waits"] == 0
        assert probe.closed
        assert probe.seconds() == waited  # closing keeps what was measured
        c.reset_stats()
        assert probe.seconds() == 0.0 and c.stats()["stream_waits"] == 0


def test_stream_wait_probes_on_closed_caches_and_bad_calls(pool):
    c = sm.SlotCache(pool, 2)
    probe = sm.StreamWaitProbe(c)
    with pytest.raises(TypeError):
        probe.seconds(True)
    with pytest.raises(TypeError):
        sm.StreamWaitProbe(pool)
    probe.close()
    probe.close()  # idempotent
    c.close()
    with pytest.raises(sm.ClosedError):
        sm.StreamWaitProbe(c)
    assert probe.seconds() == 0.0  # the total as of close
    c.reset_stats()
    assert c.stats()["stream_waits"] == 0


@pytest.mark.gpu
def test_cuda_stream_wait_is_not_timed_for_copies_that_landed():
    """A slot whose copy landed (``synchronize`` waited for it) costs the compute stream no wait:
    nothing is recorded. Exact by construction as well: an acquire times at most one wait. The
    measured seconds (never negative, none without a timed wait) and whether a demand load or a prefetch is still in flight when its
    acquire looks is timing, so that a wait is then recorded and measured (> 0 s) is shown by
    ``benches/bench_native_stream_waits.py``, not asserted here."""
    big = 64 << 20
    backend = sm.Backend("cuda")
    pool = sm.ExpertPool(backend, [("w", big)], [(0, e) for e in range(8)])
    stream = torch.cuda.Stream()
    s = stream.cuda_stream

    def waits(c):
        return c.stats()["stream_waits"], probe.seconds()

    with sm.SlotCache(pool, 4, copy_workers=0) as c, sm.StreamWaitProbe(c) as probe:
        c.prefetch(0, [0])
        c.synchronize()  # the copy has landed
        c.release(c.acquire(0, [0], s), s)
        assert waits(c) == (0, 0.0)
        c.release(c.acquire(0, [1], s), s)  # a demand load: timed when its copy is still in flight
        n, seconds = waits(c)
        assert n in (0, 1) and isinstance(seconds, float)
        c.reset_stats()
        assert waits(c) == (0, 0.0)
    with sm.SlotCache(pool, 4, copy_workers=1) as c, sm.StreamWaitProbe(c) as probe:
        c.prefetch(0, [2, 3, 4, 5])  # four copies queued on the copy stream
        c.release(c.acquire(0, [5], s), s)  # in flight, landed, or a miss loaded now
        n, seconds = waits(c)
        assert n in (0, 1) and isinstance(seconds, float)
        c.synchronize()
        before = waits(c)
        c.release(c.acquire(0, [2, 3, 4], s), s)  # landed: no wait
        assert waits(c) == before
        assert c.stats()["acquires"] == 2
    stream.synchronize()
    pool.close()


def test_the_reader_stream_moves_once_per_new_stream_and_the_table_keeps_serving(pool, backend):
    """Table reads are fenced on one reader stream at a time: a switch to another stream says
    so (the CUDA ordering is checked in Rust against a logged device), the same stream is no
    switch, and loads keep publishing through the table after switches."""
    cuda = backend.kind == "cuda"
    table = torch.zeros(16, dtype=torch.int64, device="cuda" if cuda else "cpu")
    keep = [torch.cuda.Stream(), torch.cuda.Stream()] if cuda else []
    a, b = [s.cuda_stream for s in keep] if cuda else [5, 6]
    with sm.SlotCache(pool, 3) as c:
        with pytest.raises(InvalidArgumentError, match="no expert table"):
            c.reader_stream
        with pytest.raises(InvalidArgumentError, match="no expert table"):
            c.switch_reader_stream(a)
        c.attach_expert_table(table.data_ptr(), 0)
        assert c.reader_stream == 0
        assert c.switch_reader_stream(a) is True and c.reader_stream == a
        assert c.switch_reader_stream(a) is False and c.reader_stream == a
        assert c.switch_reader_stream(b) is True and c.reader_stream == b
        assert c.note_routed(1, [3]) == 1
        c.synchronize()
        if cuda:
            torch.cuda.synchronize()
        (slot,) = [i for i, (state, _, key) in enumerate(c.slot_states()) if key == (1, 3)]
        assert int(table[8 + 3]) == c.slots_ptr + slot * c.slot_nbytes  # published: pool key order
        assert slot_payload(c, slot) == expert_bytes(1, 3)
        with pytest.raises(InvalidArgumentError):
            c.switch_reader_stream(-1)
