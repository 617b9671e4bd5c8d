"""A recorded visit sequence replayed through an eviction policy alone: the hit rate a policy
gives when every copy lands before the next visit, with no prefetches. In exact mode every
system makes the same visits, so this separates what a policy chooses from what copy timing
costs, and (fed the sequence itself) gives Belady's optimum to hold the served rows to."""

from __future__ import annotations

from collections.abc import Sequence

import sida_moe
from sida_moe.visit_trace import VisitTrace


def replay_visits(keys: Sequence[tuple[int, int]], slots: int, policy: str, trace: VisitTrace,
                  future: bool, count_from: int = 0) -> tuple[int, int]:
    """(hits, misses) of ``trace[count_from:]`` when the whole trace is replayed through a cold
    host-backend SlotCache of ``slots`` slots (the cache's own code, 1-byte records copied in the
    calling thread): table visits as decode layers hand them over (``note_routed``: every expert
    counted, then the admitted misses loaded before the next visit), the others as acquires.
    ``future``: the trace is fed to the policy first (``predictive`` is then Belady's).
    ``keys``: every (layer, expert) of the model."""
    if not 0 <= count_from <= len(trace):
        raise ValueError(f"count_from must be in [0, {len(trace)}], got {count_from}")
    pool = sida_moe.ExpertPool(sida_moe.Backend("host"), [("w", 1)], list(keys))
    cache = sida_moe.SlotCache(pool, slots, policy, copy_workers=0)
    try:
        if future:
            cache.set_future(list(trace))
        before = {"hits": 0.0, "misses": 0.0}
        for i, ((layer, experts), table) in enumerate(zip(trace, trace.through_table)):
            if i == count_from:
                before = cache.stats()
            if table:
                cache.note_routed(layer, experts)
                cache.synchronize()
            else:
                cache.release(cache.acquire(layer, experts))
        if count_from == len(trace):
            return 0, 0
        after = cache.stats()
        return int(after["hits"] - before["hits"]), int(after["misses"] - before["misses"])
    finally:
        cache.close()
        pool.close()


def policy_hit_rates(engine, trace: VisitTrace, policies: Sequence[str], count_from: int = 0) -> dict[str, float | None]:
    """For each of ``policies`` (a cache policy name, or ``belady``: the predictive policy fed the
    trace), the hit rate of ``trace[count_from:]`` replayed through a cold cache of the engine's
    slots (``replay_visits``); None where that part makes no lookups."""
    keys = [(layer.ordinal, e) for layer in engine.layers for e in range(layer.num_experts)]
    rates: dict[str, float | None] = {}
    for name in policies:
        belady = name == "belady"
        hits, misses = replay_visits(keys, engine.num_slots, "predictive" if belady else name, trace,
                                     future=belady, count_from=count_from)
        rates[name] = hits / (hits + misses) if hits + misses else None
    return rates
