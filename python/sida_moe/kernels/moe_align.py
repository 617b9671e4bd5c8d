"""Sorting a layer's (token, k) pairs by cache slot, in blocks of ``block_m`` rows (vLLM fused_moe style).

The CUDA kernel ``moe_align`` (cuda/moe_kernels.cu) does this in one launch; ``align_pairs_torch``
here is the same computation in PyTorch ops: the definition the kernel is tested against, and the
path used when a layer has more slots than the kernel's shared memory holds. Both are free of host
synchronisation (every shape depends only on ``T * k``, the slot count and ``block_m``), so both can
be captured in a CUDA graph.

Pair ``p = t * k + j`` is token ``t``'s ``j``-th expert. Its slot is ``slot_of_expert[topk_ids[t, j]]``;
pairs whose expert id is outside ``[0, E)`` or whose slot is -1 are skipped. Sorted rows hold pair
indices, grouped by slot in increasing slot order, each slot's run padded with the sentinel
``num_pairs`` to a multiple of ``block_m``, so that every block of ``block_m`` rows reads one slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def max_padded_rows(num_pairs: int, num_slots: int, block_m: int) -> int:
    """Upper bound of the sorted rows in use: each non-empty slot adds at most ``block_m - 1``
    padding rows, and at most ``min(num_pairs, num_slots)`` slots are non-empty."""
    if num_pairs < 0 or num_slots < 0 or block_m < 1:
        raise ValueError(f"need num_pairs >= 0, num_slots >= 0, block_m >= 1; got {num_pairs}, {num_slots}, {block_m}")
    rows = num_pairs + min(num_pairs, num_slots) * (block_m - 1)
    return max(block_m, (rows + block_m - 1) // block_m * block_m)


@dataclass(frozen=True)
class AlignedPairs:
    """Pairs sorted by slot. All int32 tensors on the inputs' device."""

    sorted_ids: torch.Tensor  # [max_padded] pair index per sorted row; num_pairs in padding rows
    block_slot: torch.Tensor  # [max_padded // block_m] slot of each block; -1 for blocks past the end
    pair_pos: torch.Tensor  # [num_pairs] sorted row of each pair; -1 when skipped
    group_end: torch.Tensor  # [num_slots] inclusive cumulative (unpadded) pair count per slot
    total_padded: torch.Tensor  # [1] rows in use, a multiple of block_m
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.block_slot.shape[0]


def align_pairs_torch(topk_ids: torch.Tensor, slot_of_expert: torch.Tensor, num_slots: int, block_m: int) -> AlignedPairs:
    """Sort pairs by slot with PyTorch ops (no host synchronisation). Within a slot, pairs keep
    increasing pair order."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, k], got shape {tuple(topk_ids.shape)}")
    if slot_of_expert.dim() != 1:
        raise ValueError(f"slot_of_expert must be 1-D [E], got shape {tuple(slot_of_expert.shape)}")
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    num_experts = slot_of_expert.shape[0]
    max_padded = max_padded_rows(num_pairs, num_slots, block_m)
    i64 = torch.int64

    ids = topk_ids.reshape(-1).to(i64)
    id_ok = (ids >= 0) & (ids < num_experts)
    slot = slot_of_expert.to(i64)[ids.clamp(0, max(num_experts - 1, 0))] if num_experts else torch.full_like(ids, -1)
    valid = id_ok & (slot >= 0) & (slot < num_slots)
    key = torch.where(valid, slot, torch.full_like(slot, num_slots))  # skipped pairs sort last

    counts = torch.zeros(num_slots + 1, dtype=i64, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_slots]
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    raw_end = torch.cumsum(counts, 0)
    zero = torch.zeros(1, dtype=i64, device=device)
    pad_start = torch.cat([pad_end - padded, zero])  # index num_slots: the skipped bucket
    raw_start = torch.cat([raw_end - counts, raw_end[-1:] if num_slots else zero])

    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    rank = torch.arange(num_pairs, dtype=i64, device=device)
    dest = pad_start[sorted_key] + rank - raw_start[sorted_key]
    in_slot = sorted_key < num_slots
    dest = torch.where(in_slot, dest, torch.full_like(dest, max_padded))  # skipped pairs -> dump row

    sorted_ids = torch.full((max_padded + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    pair_pos = torch.empty(num_pairs, dtype=torch.int32, device=device)
    pair_pos.scatter_(0, order, torch.where(in_slot, dest, torch.full_like(dest, -1)).to(torch.int32))

    total = pad_end[-1:] if num_slots else zero
    block_start = torch.arange(max_padded // block_m, dtype=i64, device=device) * block_m
    block_slot = torch.searchsorted(pad_end, block_start, right=True)
    block_slot = torch.where(block_start < total, block_slot, torch.full_like(block_slot, -1))

    return AlignedPairs(
        sorted_ids=sorted_ids[:max_padded],
        block_slot=block_slot.to(torch.int32),
        pair_pos=pair_pos,
        group_end=raw_end.to(torch.int32),
        total_padded=total.to(torch.int32),
        block_m=block_m,
    )


__all__ = ["AlignedPairs", "align_pairs_torch", "max_padded_rows"]
