"""RoutingFeed: expert ids still being computed on the device reach a SlotCache's prefetch
queue through a native thread (host backend: host ids; ``gpu``: ids on the GPU written on a stream),
with the bytes that land checked, remembered predictions scored against the routed rows of
``submit_routed``, skipped routed rows, errors kept for ``take_error``, many submitting
threads, and clear errors for bad arguments."""

import threading

import pytest
import torch

import sida_moe as sm
from sida_moe._native import InvalidArgumentError

NBYTES = 512


def expert_bytes(layer: int, expert: int) -> bytes:
    return bytes((layer * 11 + expert * 5 + i) % 256 for i in range(NBYTES))


@pytest.fixture(params=["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request):
    return sm.Backend(request.param)


@pytest.fixture
def pool(backend):
    keys = [(l, e) for l in range(3) for e in range(8)]
    p = sm.ExpertPool(backend, [("w", NBYTES)], keys)
    for l, e in keys:
        p.write(l, e, "w", expert_bytes(l, e))
    yield p
    p.close()


def _ids(backend, rows):
    """int64 ids on the backend's device, written on the current stream, and that stream's handle."""
    t = torch.tensor(rows, dtype=torch.int64)
    if backend.kind == "cuda":
        return t.cuda(), torch.cuda.current_stream().cuda_stream
    return t, None


def _check_bytes(cache):
    cache.synchronize()
    for (layer, expert), slot in cache.resident().items():
        assert cache.read_slot(slot)[:NBYTES] == expert_bytes(layer, expert), (layer, expert, slot)


def test_feed_only_rows_load_nothing_and_are_remembered(pool, backend):
    with sm.SlotCache(pool, 12, policy="predictive") as c, sm.RoutingFeed(c) as f:
        ids, stream = _ids(backend, [[1, 2, 2, 1], [0, 5, 5, 7], [3, 4, 3, 4]])
        f.submit_predicted(ids.data_ptr(), [0, 1, 2], 4, stream, future=True, remember=True, feed_only=True)
        assert f.wait(10)
        c.synchronize()
        assert c.resident() == {}
        s = _stats(c, f)
        assert s["deferred_handled"] == 1 and s["deferred_queued"] == 0 and s["prefetch_queued"] == 0
        assert f.take_error() is None


def test_prediction_is_prefetched_and_fed_to_the_policy(pool, backend):
    with sm.SlotCache(pool, 12, policy="predictive") as c, sm.RoutingFeed(c) as f:
        ids, stream = _ids(backend, [[1, 2, 2, 1], [0, 5, 5, 7], [3, 4, 3, 4]])
        f.submit_predicted(ids.data_ptr(), [0, 1, 2], 4, stream, generation=4, future=True, remember=True)
        assert f.wait(10)
        c.synchronize()
        assert set(c.resident()) == {(0, 1), (0, 2), (1, 0), (1, 5), (1, 7), (2, 3), (2, 4)}
        _check_bytes(c)
        s = _stats(c, f)
        assert s["deferred_submitted"] == s["deferred_handled"] == 1 and s["deferred_queued"] == 7
        # nothing routed yet: the remembered prediction is not scored
        assert (s["predicted_hits"], s["predicted_needed"], s["predicted_experts"]) == (0, 0, 0)
        # a later request on the demand lane queues only what is not resident
        fix, stream = _ids(backend, [[4, 6]])
        f.submit_predicted(fix.data_ptr(), [2], 2, stream, generation=4, priority="demand")
        assert f.wait(10)
        c.synchronize()
        assert (2, 6) in c.resident()
        assert _stats(c, f)["deferred_queued"] == 8
        assert f.take_error() is None
        _check_bytes(c)


def _routed(backend, rows):
    """Routed rows as a decode step hands them over: each row's ids, then the table entry each
    pair read (0 here: not a slot, so every visit counts as a miss)."""
    return _ids(backend, [list(r) + [0] * len(r) for r in rows])


def _stats(cache, feed) -> dict:
    return {**cache.stats(), **feed.stats()}


def _scores(cache, feed) -> tuple[float, float, float]:
    s = _stats(cache, feed)
    return s["predicted_hits"], s["predicted_needed"], s["predicted_experts"]


def test_remembered_predictions_are_scored_against_the_next_routed_rows(pool, backend):
    """``remember=True`` keeps each layer's distinct predicted experts; the next routed row of that
    layer (``submit_routed``, negative ids padding) is scored against it once: routed experts that
    were predicted, routed experts, predicted experts. ``reset_stats`` zeroes the scores."""
    with sm.SlotCache(pool, 12) as c, sm.RoutingFeed(c) as f:
        pred, stream = _ids(backend, [[1, 2, 2, 3], [0, 5, 5, 0], [7, 6, 7, 6]])
        f.submit_predicted(pred.data_ptr(), [0, 1, 2], 4, stream, generation=1, remember=True)
        # the step's routing: layer 0 used 1 and 4 (one predicted), layer 1 used 0 and 5 (both); layer
        # 2 is not routed yet and stays unscored
        routed, stream = _routed(backend, [[1, 4, -1], [0, 5, -1]])
        f.submit_routed(routed.data_ptr(), [0, 1], 3, stream)
        assert f.wait(10)
        assert _scores(c, f) == (3, 4, 5)  # predicted: 3 experts of layer 0, 2 of layer 1
        # a prediction is scored once: layer 0's next routing has nothing to be scored against
        again, stream = _routed(backend, [[1, 2]])
        f.submit_routed(again.data_ptr(), [0], 2, stream)
        assert f.wait(10)
        assert _scores(c, f) == (3, 4, 5)
        # layer 2, routed later, still meets its remembered prediction (6, 7): one hit of 2
        late, stream = _routed(backend, [[6, 0]])
        f.submit_routed(late.data_ptr(), [2], 2, stream)
        assert f.wait(10)
        assert _scores(c, f) == (4, 6, 7)
        # a prediction without remember=True is prefetched, not scored
        plain, stream = _ids(backend, [[3, 4]])
        f.submit_predicted(plain.data_ptr(), [1], 2, stream, generation=2)
        row, stream = _routed(backend, [[3, 4]])
        f.submit_routed(row.data_ptr(), [1], 2, stream)
        assert f.wait(10)
        assert _scores(c, f) == (4, 6, 7)
        c.reset_stats()
        f.reset_stats()
        assert _scores(c, f) == (0, 0, 0)
        s = _stats(c, f)
        assert s["deferred_submitted"] == s["deferred_handled"] == 6  # deferred_* counts keep running
        # a newer remembered prediction replaces the older one of every layer; scoring starts from zero
        old, stream = _ids(backend, [[1, 2], [1, 2]])
        f.submit_predicted(old.data_ptr(), [0, 1], 2, stream, generation=3, remember=True)
        new, stream = _ids(backend, [[3, 4]])
        f.submit_predicted(new.data_ptr(), [0], 2, stream, generation=4, remember=True)
        both, stream = _routed(backend, [[3, 5], [1, 2]])
        f.submit_routed(both.data_ptr(), [0, 1], 2, stream)
        assert f.wait(10)
        assert _scores(c, f) == (1, 2, 2)  # layer 0 against (3, 4); layer 1's older prediction is gone
        assert f.take_error() is None


def test_skip_routed_counts_only_acquires_after_the_submission(pool, backend):
    with sm.SlotCache(pool, 12) as c, sm.RoutingFeed(c) as f:
        ids, stream = _ids(backend, [[6], [6]])
        # the first row's acquire happens between the submission and the ids being read: on the
        # host the copy is done at submission, so acquire first and count from before it
        c.release(c.acquire(0, [2]))
        f.submit_predicted(ids.data_ptr(), [0, 1], 1, stream, skip_routed=True)
        assert f.wait(10)
        c.synchronize()
        assert (1, 6) in c.resident()  # nothing was routed after the submission: both rows queued
        assert (0, 6) in c.resident()


def test_errors_met_by_the_thread_are_kept_and_the_thread_goes_on(pool, backend):
    with sm.SlotCache(pool, 8) as c, sm.RoutingFeed(c) as f:
        bad, stream = _ids(backend, [[9, 1]])
        f.submit_predicted(bad.data_ptr(), [0], 2, stream)
        good, stream = _ids(backend, [[3]])
        f.submit_predicted(good.data_ptr(), [1], 1, stream)
        assert f.wait(10)
        err = f.take_error()
        assert err is not None and "9" in err
        assert f.take_error() is None
        c.synchronize()
        assert (1, 3) in c.resident()


def test_bad_arguments_raise_and_queue_nothing(pool, backend):
    with sm.SlotCache(pool, 4) as c, sm.RoutingFeed(c) as f:
        ids, stream = _ids(backend, [[1, 2]])
        ptr = ids.data_ptr()
        for args, kwargs, match in [
            ((ptr, [], 2, stream), {}, "layer"),
            ((ptr, [-1], 2, stream), {}, "non-negative"),
            ((ptr, [0], 0, stream), {}, "width"),
            ((0, [0], 2, stream), {}, "non-null"),
            ((ptr, [0], 2, stream), {"generation": -1}, "generation"),
            ((ptr, [0], 2, stream), {"priority": "soon"}, "priority"),
            ((ptr, [0], 2, -5), {}, "stream"),
        ]:
            with pytest.raises(InvalidArgumentError, match=match):
                f.submit_predicted(*args, **kwargs)
        with pytest.raises(TypeError):
            f.submit_predicted(ptr, "0", 2, stream)
        with pytest.raises(InvalidArgumentError, match="timeout"):
            f.wait(-1.0)
        assert _stats(c, f)["deferred_submitted"] == 0 and c.resident() == {}
    with pytest.raises(sm.ClosedError, match="closed"):
        f.submit_predicted(ptr, [0], 2, stream)


def test_many_threads_submit_and_every_slot_holds_its_expert(pool, backend):
    with sm.SlotCache(pool, 10, copy_workers=3) as c, sm.RoutingFeed(c) as f:
        errors = []

        def submit(t):
            try:
                for i in range(150):
                    rows = [[(t + i) % 8, (3 * t + i) % 8]]
                    ids, stream = _ids(backend, rows)
                    f.submit_predicted(ids.data_ptr(), [(t + i) % 3], 2, stream, generation=i,
                                        remember=i % 5 == 0, skip_routed=i % 3 == 0,
                                        priority="demand" if i % 2 else "prefetch")
                    if backend.kind == "cuda":
                        torch.cuda.current_stream().synchronize()  # keep ids alive until copied
                    if i % 10 == 0:
                        layer = (t + i) % 3
                        c.release(c.acquire(layer, [i % 8]))
            except Exception as exc:  # noqa: BLE001 -- reported below
                errors.append(exc)

        threads = [threading.Thread(target=submit, args=(t,)) for t in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        assert f.wait(30)
        s = _stats(c, f)
        assert s["deferred_submitted"] == s["deferred_handled"] == 900
        assert f.take_error() is None
        _check_bytes(c)
