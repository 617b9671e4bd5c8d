"""A recorded visit sequence replayed through an eviction policy alone: the hit rate a policy
gives when every copy lands before the next visit, with no prefetches. In exact mode every
system makes the same visits, so this separates what a policy chooses from what copy timing
costs, and (fed the sequence itself) gives Belady's optimum to hold the served rows to."""

from __future__ import annotations

from collections.abc import Sequence

from sida_moe import _native
from sida_moe.visit_trace import VisitTrace


def policy_hit_rates(num_slots: int, trace: VisitTrace, policies: Sequence[str], count_from: int = 0) -> dict[str, float | None]:
    """For each of ``policies`` (a cache policy name, or ``belady``: the predictive policy fed the
    trace), the hit rate of ``trace[count_from:]`` when the whole trace runs through a cold cache
    of ``num_slots`` slots, each visit on the path it took (``simulate_policy``); None where that
    part makes no lookups."""
    paths = ["table" if t else "acquire" for t in trace.through_table]
    rates: dict[str, float | None] = {}
    for name in policies:
        belady = name == "belady"
        c = _native.simulate_policy("predictive" if belady else name, num_slots, trace, future=belady,
                                    path=paths, count_from=count_from)
        rates[name] = c["hits"] / (c["hits"] + c["misses"]) if c["hits"] + c["misses"] else None
    return rates
