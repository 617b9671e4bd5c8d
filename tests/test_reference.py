"""The PyTorch reference kernel: the math of one MoE layer from slot views, chunking by -1 slots,
biases and the GPT-OSS activation, and input validation."""

import pytest
import torch
import torch.nn.functional as F

from sida_moe.format import ExpertFormat, slot_views
from sida_moe.kernels.reference import fused_experts_reference


def _random_slots(fmt, num_slots, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets, size = {}, 0
    for name, nbytes in fmt.layout():
        offsets[name] = size
        size += -(-nbytes // 256) * 256
    buf = torch.zeros(num_slots, size, dtype=torch.uint8)
    views = slot_views(buf, fmt, offsets)
    for v in (views.gate_up, views.down, views.gate_up_bias, views.down_bias):
        if v is not None:
            v.copy_(torch.randn(v.shape, generator=g).to(fmt.dtype) * 0.5)
    return views


def _naive(hidden, ids, weights, table, views, fmt):
    """Token by token, pair by pair: the definition in sida_moe.format."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for k in range(ids.shape[1]):
            slot = int(table[ids[t, k]])
            if slot < 0:
                continue
            z = views.gate_up[slot].double() @ hidden[t].double()
            if views.gate_up_bias is not None:
                z = z + views.gate_up_bias[slot].double()
            i = fmt.intermediate
            if fmt.activation == "gpt_oss":
                gate, up = z[:i].clamp(max=fmt.limit), z[i:].clamp(-fmt.limit, fmt.limit)
                a = (up + 1) * gate * torch.sigmoid(fmt.alpha * gate)
            elif fmt.gated:
                a = F.silu(z[:i]) * z[i:]
            else:
                a = F.relu(z)
            y = views.down[slot].double() @ a
            if views.down_bias is not None:
                y = y + views.down_bias[slot].double()
            out[t] += float(weights[t, k]) * y
    return out


@pytest.mark.parametrize("fmt", [
    ExpertFormat(hidden=16, intermediate=8, dtype=torch.float32),
    ExpertFormat(hidden=16, intermediate=8, dtype=torch.float32, gated=False, activation="relu"),
    ExpertFormat(hidden=16, intermediate=8, dtype=torch.float32, activation="gpt_oss", has_bias=True, limit=1.0),
], ids=["silu", "relu", "gpt_oss"])
def test_matches_the_definition(fmt):
    views = _random_slots(fmt, 5)
    table = torch.tensor([3, -1, 0, 4, 1, 2, -1], dtype=torch.int32)  # experts 1 and 6 not resident
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 16, generator=g)
    ids = torch.tensor([[0, 2], [1, 3], [4, 5], [6, 0], [2, 3], [5, 4]])
    weights = torch.rand(6, 2, generator=g)
    got = fused_experts_reference(hidden, ids, weights, table, views, fmt)
    torch.testing.assert_close(got.double(), _naive(hidden, ids, weights, table, views, fmt), rtol=1e-5, atol=1e-5)


def test_chunks_accumulate_to_the_whole():
    fmt = ExpertFormat(hidden=16, intermediate=8, dtype=torch.float32)
    views = _random_slots(fmt, 4)
    full = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    first, second = torch.tensor([0, 1, -1, -1], dtype=torch.int32), torch.tensor([-1, -1, 2, 3], dtype=torch.int32)
    hidden = torch.randn(5, 16)
    ids = torch.randint(0, 4, (5, 2))
    weights = torch.rand(5, 2)
    out = fused_experts_reference(hidden, ids, weights, first, views, fmt)
    out = fused_experts_reference(hidden, ids, weights, second, views, fmt, out=out)
    torch.testing.assert_close(out, fused_experts_reference(hidden, ids, weights, full, views, fmt))


def test_no_resident_expert_gives_zeros_and_empty_batch():
    fmt = ExpertFormat(hidden=8, intermediate=4, dtype=torch.float32)
    views = _random_slots(fmt, 2)
    table = torch.full((3,), -1, dtype=torch.int32)
    out = fused_experts_reference(torch.randn(3, 8), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), table, views, fmt)
    assert torch.equal(out, torch.zeros(3, 8))
    empty = fused_experts_reference(torch.randn(0, 8), torch.zeros(0, 1, dtype=torch.long), torch.ones(0, 1), table, views, fmt)
    assert empty.shape == (0, 8)


@pytest.mark.parametrize("change, error, match", [
    (dict(hidden=torch.randn(3, 7)), ValueError, "hidden must be"),
    (dict(hidden=torch.randn(3, 8, dtype=torch.float64)), TypeError, "fmt.dtype"),
    (dict(ids=torch.zeros(3, 1)), TypeError, "topk_ids must be int32 or int64"),
    (dict(ids=torch.full((3, 1), 5)), ValueError, "out of range"),
    (dict(weights=torch.ones(3, 2)), ValueError, "topk_weights must have topk_ids' shape"),
    (dict(table=torch.zeros(3)), TypeError, "slot_of_expert must be int32"),
    (dict(table=torch.zeros(3, 1, dtype=torch.int32)), ValueError, "slot_of_expert must be a non-empty 1-D"),
    (dict(out=torch.zeros(3, 8, dtype=torch.float64)), ValueError, "out must be"),
])
def test_bad_inputs(change, error, match):
    """The reference checks its inputs by the same rules (classes and messages) as the dispatch."""
    fmt = ExpertFormat(hidden=8, intermediate=4, dtype=torch.float32)
    args = dict(hidden=torch.randn(3, 8), ids=torch.zeros(3, 1, dtype=torch.long), weights=torch.ones(3, 1),
                table=torch.zeros(3, dtype=torch.int32), out=None)
    args.update(change)
    with pytest.raises(error, match=match):
        fused_experts_reference(args["hidden"], args["ids"], args["weights"], args["table"], _random_slots(fmt, 2), fmt, args["out"])
