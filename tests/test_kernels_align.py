"""Sorting (token, k) pairs by slot into blocks (``moe_align``): the PyTorch version against its
definition, on CPU; the CUDA kernel is checked against this version in test_kernels_cuda.py."""

from __future__ import annotations

import pytest
import torch

from sida_moe.kernels.configs import (
    DEFAULT_CROSSOVERS,
    Crossovers,
    LaunchPlan,
    choose_plan,
    crossovers_for,
    forced_regime,
    gemv_block_m,
    mma_block_m,
)
from sida_moe.kernels.moe_align import AlignedPairs, align_pairs_torch, max_padded_rows


def check_alignment(a: AlignedPairs, topk_ids: torch.Tensor, slot_of_expert: torch.Tensor, num_slots: int,
                    ordered_within_slot: bool) -> None:
    """Assert that ``a`` is a valid alignment of the pairs: the definition both versions must meet."""
    bm = a.block_m
    ids = topk_ids.reshape(-1).cpu().tolist()
    table = slot_of_expert.cpu().tolist()
    num_pairs = len(ids)
    slot_of_pair = [table[e] if 0 <= e < len(table) else -1 for e in ids]
    counts = [0] * num_slots
    for s in slot_of_pair:
        if 0 <= s < num_slots:
            counts[s] += 1
    sorted_ids = a.sorted_ids.cpu().tolist()
    block_slot = a.block_slot.cpu().tolist()
    pair_pos = a.pair_pos.cpu().tolist()
    total = int(a.total_padded.cpu()[0])
    assert len(sorted_ids) == max_padded_rows(num_pairs, num_slots, bm)
    assert total == sum((c + bm - 1) // bm * bm for c in counts) and total % bm == 0
    assert a.group_end.cpu().tolist() == [sum(counts[: s + 1]) for s in range(num_slots)]
    row = 0
    for s in range(num_slots):
        run = sorted_ids[row : row + (counts[s] + bm - 1) // bm * bm]
        real = run[: counts[s]]
        assert sorted(real) == [p for p in range(num_pairs) if slot_of_pair[p] == s]
        if ordered_within_slot:
            assert real == sorted(real)
        assert all(p == num_pairs for p in run[counts[s] :]), "padding rows must hold the sentinel"
        for b in range(row // bm, (row + len(run)) // bm):
            assert block_slot[b] == s
        row += len(run)
    assert all(p == num_pairs for p in sorted_ids[total:])
    assert all(s == -1 for s in block_slot[total // bm :])
    for p in range(num_pairs):
        if 0 <= slot_of_pair[p] < num_slots:
            assert sorted_ids[pair_pos[p]] == p
        else:
            assert pair_pos[p] == -1


@pytest.mark.parametrize("block_m", [1, 4, 16])
@pytest.mark.parametrize("num_tokens,num_experts,top_k,num_slots", [(1, 8, 2, 8), (7, 16, 4, 20), (64, 8, 2, 11), (33, 128, 8, 128)])
def test_align_torch_meets_definition(block_m: int, num_tokens: int, num_experts: int, top_k: int, num_slots: int) -> None:
    gen = torch.Generator().manual_seed(num_tokens * 131 + block_m)
    logits = torch.randn(num_tokens, num_experts, generator=gen) + torch.randn(num_experts, generator=gen) * 2
    ids = torch.topk(logits, top_k, dim=1).indices
    table = torch.randperm(num_slots, generator=gen)[:num_experts].to(torch.int32)
    table[torch.randperm(num_experts, generator=gen)[: num_experts // 4]] = -1
    a = align_pairs_torch(ids, table, num_slots, block_m)
    check_alignment(a, ids, table, num_slots, ordered_within_slot=True)


def test_align_skips_out_of_range_ids_and_handles_no_pairs() -> None:
    ids = torch.tensor([[0, 5], [-1, 2]], dtype=torch.int32)  # 5 and -1 are not experts of a 3-expert layer
    table = torch.tensor([2, -1, 0], dtype=torch.int32)
    a = align_pairs_torch(ids, table, num_slots=3, block_m=4)
    check_alignment(a, ids, table, 3, ordered_within_slot=True)
    assert a.pair_pos.tolist() == [4, -1, -1, 0]
    none = align_pairs_torch(torch.zeros((0, 2), dtype=torch.int64), table, num_slots=3, block_m=4)
    assert int(none.total_padded[0]) == 0 and none.block_slot.tolist() == [-1]


def test_max_padded_rows_bounds_and_errors() -> None:
    assert max_padded_rows(8, 128, 8) == 64  # 8 pairs, at most 8 non-empty slots, 7 padding rows each
    assert max_padded_rows(8, 1, 8) == 16
    assert max_padded_rows(5, 3, 1) == 5
    with pytest.raises(ValueError, match="block_m >= 1"):
        max_padded_rows(4, 4, 0)


def test_plan_choice_follows_pairs_per_expert() -> None:
    assert choose_plan(1, 8, 128, grouped_mm_ok=True) == LaunchPlan("gemv", 4)
    assert choose_plan(64, 8, 128, grouped_mm_ok=True).regime == "mma"
    assert choose_plan(4096, 8, 128, grouped_mm_ok=True) == LaunchPlan("grouped_mm", 1)
    assert choose_plan(4096, 8, 128, grouped_mm_ok=False) == LaunchPlan("mma", 32)
    assert choose_plan(4096, 8, 128, grouped_mm_ok=False, mma_ok=False).regime == "gemv"
    assert gemv_block_m(0.06) == 4 and gemv_block_m(6) == 8 and gemv_block_m(100) == 16
    assert mma_block_m(0.5) == 16 and mma_block_m(9) == 16 and mma_block_m(500) == 32
    assert choose_plan(7, 8, 128, grouped_mm_ok=True) == LaunchPlan("mma", 16)  # 0.44 pairs per expert
    with forced_regime("gemv"):
        assert choose_plan(4096, 8, 128, grouped_mm_ok=True).regime == "gemv"
    with forced_regime("grouped_mm"):
        assert choose_plan(1, 8, 128, grouped_mm_ok=False).regime == "gemv"  # unavailable: automatic choice
    assert choose_plan(4096, 8, 128, grouped_mm_ok=True).regime == "grouped_mm"  # the block's regime is gone
    with pytest.raises(ValueError, match="regime must be one of"):
        with forced_regime("tensor"):
            pass


def test_a_devices_crossovers_move_the_regime_boundaries() -> None:
    """Each device's measured crossovers (its tuned table) decide the regime; a device without a
    table gets the default one, and a table whose order is impossible is refused."""
    assert crossovers_for("a GPU nobody measured") == DEFAULT_CROSSOVERS
    wide = Crossovers(gemv_max_pairs_per_expert=1.0, mma_max_pairs_per_expert=64.0)
    assert choose_plan(7, 8, 128, grouped_mm_ok=True).regime == "mma"
    assert choose_plan(7, 8, 128, grouped_mm_ok=True, crossovers=wide).regime == "gemv"
    # 32 pairs per expert: past mma's default reach, inside the wide table's
    assert choose_plan(512, 8, 128, grouped_mm_ok=True).regime == "grouped_mm"
    assert choose_plan(512, 8, 128, grouped_mm_ok=True, crossovers=wide).regime == "mma"
    assert choose_plan(2048, 8, 128, grouped_mm_ok=True, crossovers=wide).regime == "grouped_mm"
    with pytest.raises(ValueError, match="gemv_max_pairs_per_expert <= mma_max_pairs_per_expert"):
        Crossovers(gemv_max_pairs_per_expert=8.0, mma_max_pairs_per_expert=6.0)


def test_a_bad_forced_regime_in_the_environment_fails_at_import() -> None:
    import os
    import subprocess
    import sys

    env = dict(os.environ, SIDA_MOE_KERNEL_REGIME="tensor")
    res = subprocess.run([sys.executable, "-c", "import sida_moe.kernels.configs"], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "SIDA_MOE_KERNEL_REGIME must be one of" in res.stderr


def test_launch_plan_rejects_unknown_regimes_and_block_sizes() -> None:
    with pytest.raises(ValueError, match="regime must be one of"):
        LaunchPlan("wgmma", 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_m for mma must be one of"):
        LaunchPlan("mma", 4)
