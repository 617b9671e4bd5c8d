"""Trace-driven simulation of the expert cache during batch-1 decode, with and without the predictor.

It answers "how many expert acquires would hit" for a slot budget, from routing traces alone (no
GPU, no timing: every prefetch is assumed to land before its layer runs). The real engine's numbers
(hit rate and copy stalls under real timing) come from the end-to-end decode benchmark; this gives
the upper bound prediction can reach and a quick way to compare policies.

Per token, MoE layers are visited in order and each acquires the experts the router chose
(``true[l]``). Strategies:
- ``lru``: demand loads only, least-recently-used eviction.
- ``predict_lru``: before the token's layers run, the predictor's top-k of every layer are
  prefetched (layer order); eviction LRU, never evicting an expert predicted for this token.
- ``predict_future``: as ``predict_lru`` but evicting the resident expert whose next predicted use
  (the rest of this token's layers) is furthest, never-predicted first, LRU among ties -- the
  predictive policy fed by ``set_future``.
- ``*_refined``: additionally, once layer l's routing is known, layer l+1's prediction is refined
  (conditioned predictor) and its experts are prefetched.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

Key = tuple[int, int]


class _Cache:
    def __init__(self, capacity: int, future_aware: bool) -> None:
        self.capacity = capacity
        self.future_aware = future_aware
        self.lru: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self.lru.move_to_end(key)

    def insert(self, key: Key, protected: set[Key], next_use: dict[Key, int]) -> bool:
        """Make ``key`` resident; False when every resident expert is protected."""
        if key in self.lru:
            self.touch(key)
            return True
        if len(self.lru) >= self.capacity:
            victim = None
            if self.future_aware:
                best = -1
                for cand in self.lru:  # LRU order: the first of equal rank wins
                    if cand in protected:
                        continue
                    rank = next_use.get(cand, 1 << 30)
                    if rank > best:
                        best, victim = rank, cand
            else:
                victim = next((c for c in self.lru if c not in protected), None)
            if victim is None:
                return False
            del self.lru[victim]
        self.lru[key] = None
        return True


def simulate_decode(
    true_ids: torch.Tensor,
    predicted_ids: torch.Tensor | None,
    num_slots: int,
    strategy: str,
    refined_ids: torch.Tensor | None = None,
) -> dict[str, float]:
    """Hit rate of one strategy over decode traces.

    ``true_ids``: ``[L, N, S, k]`` routing of N sequences; ``predicted_ids``: ``[L, N, S, k']``
    (needed by the ``predict_*`` strategies); ``refined_ids``: ``[L, N, S, k']`` predictions of
    layer l given layer l-1's true routing (``*_refined``). The cache starts empty per sequence.
    """
    strategies = ("lru", "predict_lru", "predict_future", "predict_lru_refined", "predict_future_refined")
    if strategy not in strategies:
        raise ValueError(f"strategy must be one of {strategies}, got {strategy!r}")
    L, N, S, k = true_ids.shape
    if num_slots < k:
        raise ValueError(f"num_slots ({num_slots}) must hold at least one layer's top-{k}")
    predicting = strategy != "lru"
    refining = strategy.endswith("_refined")
    if predicting and predicted_ids is None:
        raise ValueError(f"strategy {strategy!r} needs predicted_ids")
    if refining and refined_ids is None:
        raise ValueError(f"strategy {strategy!r} needs refined_ids")
    true_l = true_ids.tolist()
    pred_l = predicted_ids.tolist() if predicting else None
    ref_l = refined_ids.tolist() if refining else None
    hits = acquires = prefetches = useful = 0
    for n in range(N):
        cache = _Cache(num_slots, future_aware="future" in strategy)
        for s in range(S):
            prefetched: set[Key] = set()
            next_use: dict[Key, int] = {}
            if predicting:
                plan = [[(l, e) for e in pred_l[l][n][s]] for l in range(L)]
                for l in range(L - 1, -1, -1):
                    for key in plan[l]:
                        next_use[key] = l
                protected: set[Key] = set()
                for l in range(L):
                    protected.update(plan[l])
                    for key in plan[l]:
                        if key not in cache.lru and cache.insert(key, protected, next_use):
                            prefetched.add(key)
                            prefetches += 1
            for l in range(L):
                need = [(l, e) for e in true_l[l][n][s]]
                for key in need:
                    acquires += 1
                    if key in cache.lru:
                        hits += 1
                        if key in prefetched:
                            useful += 1
                            prefetched.discard(key)
                        cache.touch(key)
                    else:
                        cache.insert(key, set(need), {k2: v for k2, v in next_use.items() if v > l})
                if refining and l + 1 < L:
                    later = {k2: v for k2, v in next_use.items() if v > l}
                    for e in ref_l[l + 1][n][s]:
                        key = (l + 1, e)
                        later[key] = l + 1
                        if key not in cache.lru and cache.insert(key, set(need) | {key}, later):
                            prefetched.add(key)
                            prefetches += 1
                    next_use = later
    return {
        "strategy": strategy,
        "num_slots": num_slots,
        "hit_rate": hits / acquires if acquires else 0.0,
        "acquires": acquires,
        "prefetches": prefetches,
        "prefetch_precision": useful / prefetches if prefetches else 0.0,
    }


def simulate_all(
    true_ids: torch.Tensor,
    predicted_ids: torch.Tensor,
    num_slots: int,
    refined_ids: torch.Tensor | None = None,
    strategies: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """``simulate_decode`` for every applicable strategy."""
    if strategies is None:
        strategies = ["lru", "predict_lru", "predict_future"]
        if refined_ids is not None:
            strategies += ["predict_lru_refined", "predict_future_refined"]
    return {s: simulate_decode(true_ids, predicted_ids, num_slots, s, refined_ids) for s in strategies}


__all__ = ["simulate_all", "simulate_decode"]
