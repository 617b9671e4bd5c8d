"""Trace-driven simulation of the expert cache during batch-1 decode, with and without the predictor.

It answers "how many expert acquires would hit" for a slot budget, from routing traces alone (no
GPU, no timing: every prefetch is assumed to land before its layer runs), through the serving
cache's own slot table and policies (``sida_moe.simulate_policy``). The real engine's numbers
(hit rate and copy stalls under real timing) come from the end-to-end decode benchmark; this gives
the upper bound prediction can reach and a quick way to compare policies.

Per token, MoE layers are visited in order and each acquires the experts the router chose
(``true[l]``). Strategies:
- ``lru``: demand loads only, the LRU policy.
- ``predict_lru``: before the token's layers run, the predictor's top-k of every layer are
  prefetched (layer order; a prefetch never evicts another prefetch not used yet); LRU policy.
- ``predict_future``: as ``predict_lru`` with the predictive policy, told the token's
  predictions as the future of its layers (evicting the expert whose next predicted use is
  furthest, never-predicted first) -- the policy the SiDA prefetcher feeds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sida_moe import _native

STRATEGIES = ("lru", "predict_lru", "predict_future")


def _sequence_visits(true_l, pred_l, n: int, S: int, L: int) -> tuple[list, list[str]]:
    """Sequence ``n``'s visits and their paths: per token, its predictions (prefetch visits),
    then each layer's true experts (acquires)."""
    visits: list[tuple[int, list[int]]] = []
    paths: list[str] = []
    for s in range(S):
        if pred_l is not None:
            for l in range(L):
                visits.append((l, pred_l[l][n][s]))
                paths.append("prefetch")
        for l in range(L):
            visits.append((l, true_l[l][n][s]))
            paths.append("acquire")
    return visits, paths


def simulate_decode(
    true_ids: torch.Tensor,
    predicted_ids: torch.Tensor | None,
    num_slots: int,
    strategy: str,
) -> dict[str, float]:
    """Hit rate of one strategy over decode traces.

    ``true_ids``: ``[L, N, S, k]`` routing of N sequences; ``predicted_ids``: ``[L, N, S, k']``
    (needed by the ``predict_*`` strategies). The cache starts empty per sequence.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    L, N, S, k = true_ids.shape
    if num_slots < k:
        raise ValueError(f"num_slots ({num_slots}) must hold at least one layer's top-{k}")
    predicting = strategy != "lru"
    if predicting and predicted_ids is None:
        raise ValueError(f"strategy {strategy!r} needs predicted_ids")
    policy = "predictive" if "future" in strategy else "lru"
    true_l = true_ids.tolist()
    pred_l = predicted_ids.tolist() if predicting else None
    hits = misses = prefetches = used = 0
    for n in range(N):
        visits, paths = _sequence_visits(true_l, pred_l, n, S, L)
        c = _native.simulate_policy(policy, num_slots, visits, future=False, path=paths)
        hits, misses = hits + c["hits"], misses + c["misses"]
        prefetches, used = prefetches + c["prefetches"], used + c["prefetch_used"]
    acquires = hits + misses
    return {
        "strategy": strategy,
        "num_slots": num_slots,
        "hit_rate": hits / acquires if acquires else 0.0,
        "acquires": acquires,
        "prefetches": prefetches,
        "prefetch_precision": used / prefetches if prefetches else 0.0,
    }


def simulate_all(
    true_ids: torch.Tensor,
    predicted_ids: torch.Tensor,
    num_slots: int,
    strategies: Sequence[str] = STRATEGIES,
) -> dict[str, dict[str, float]]:
    """``simulate_decode`` for each of ``strategies``."""
    return {s: simulate_decode(true_ids, predicted_ids, num_slots, s) for s in strategies}


__all__ = ["STRATEGIES", "simulate_all", "simulate_decode"]
