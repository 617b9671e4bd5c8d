"""The float64 oracle of the expert kernels, the synthetic slot memory and routing they are tested on,
and the CPU side of ``sida_moe.kernels.fused_experts`` (dispatch to the reference, input checks).

``fused_experts_fp64``, ``make_slots`` and ``make_routing`` are imported by the GPU tests and by
``benches/kernels_h100.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from sida_moe.format import ExpertFormat, SlotWeights, slot_views
from sida_moe.kernels import fused_experts

RECORD_ALIGN = 256  # ExpertPool aligns each tensor of an expert record, and the record, to 256 bytes


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def make_slots(fmt: ExpertFormat, num_slots: int, device: torch.device | str, gen: torch.Generator) -> tuple[torch.Tensor, SlotWeights]:
    """A ``[num_slots, slot_nbytes]`` uint8 slot buffer laid out like the cache's (256-byte aligned
    tensors in a padded record) holding random experts, and its typed views."""
    offsets: dict[str, int] = {}
    off = 0
    for name, nbytes in fmt.layout():
        offsets[name] = off
        off = _round_up(off + nbytes, RECORD_ALIGN)
    buffer = torch.empty((num_slots, _round_up(off, RECORD_ALIGN)), dtype=torch.uint8, device=device)
    buffer.view(fmt.dtype).fill_(float("nan"))  # padding must never be read into a result
    views = slot_views(buffer, fmt, offsets)
    scale = {"gate_up": 1 / math.sqrt(fmt.hidden), "down": 1 / math.sqrt(fmt.intermediate), "gate_up_bias": 0.5, "down_bias": 0.5}
    # draw on the buffer's device (GiBs of experts would take long on the CPU), seeded from ``gen``
    dev_gen = torch.Generator(device=buffer.device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    for name, s in scale.items():
        view = getattr(views, name)
        if view is not None:
            for slot in range(num_slots):  # one slot at a time bounds the float32 temporary
                view[slot].copy_(torch.randn(view.shape[1:], generator=dev_gen, device=buffer.device).mul_(s))
    return buffer, views


def make_routing(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    gen: torch.Generator,
    device: torch.device | str,
    dead_experts: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing with ragged per-expert counts (a random popularity per expert) and
    ``dead_experts`` experts that never receive a token. Returns (int64 ids, fp32 weights)."""
    popularity = torch.randn(num_experts, generator=gen) * 1.5
    if dead_experts:
        popularity[torch.randperm(num_experts, generator=gen)[:dead_experts]] = -float("inf")
    logits = torch.randn(num_tokens, num_experts, generator=gen) + popularity
    vals, ids = torch.topk(logits, top_k, dim=1)
    weights = torch.softmax(vals, dim=1)
    return ids.to(device), weights.to(device)


def make_slot_table(num_experts: int, num_slots: int, gen: torch.Generator, device: torch.device | str,
                    missing: int = 0) -> torch.Tensor:
    """Experts on a random permutation of slots, ``missing`` of them not resident (-1)."""
    if num_slots < num_experts - missing:
        raise ValueError("not enough slots for the resident experts")
    table = torch.randperm(num_slots, generator=gen)[:num_experts].to(torch.int32)
    if missing:
        table[torch.randperm(num_experts, generator=gen)[:missing]] = -1
    return table.to(device)


def _act_fp64(z: torch.Tensor, fmt: ExpertFormat) -> torch.Tensor:
    def plain(v: torch.Tensor) -> torch.Tensor:
        if fmt.activation == "silu":
            return v / (1 + torch.exp(-v))
        if fmt.activation == "gelu":
            return 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))
        if fmt.activation == "gelu_tanh":
            return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
        return v.clamp_min(0)

    if not fmt.gated:
        return plain(z)
    gate, up = z[:, : fmt.intermediate], z[:, fmt.intermediate :]
    if fmt.activation == "gpt_oss":
        gate = gate.clamp(max=fmt.limit)
        up = up.clamp(-fmt.limit, fmt.limit)
        return gate * torch.sigmoid(fmt.alpha * gate) * (up + 1)
    return plain(gate) * up


def fused_experts_fp64(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    slot_of_expert: torch.Tensor,
    weights: SlotWeights,
    fmt: ExpertFormat,
) -> torch.Tensor:
    """``sum_k w[t,k] * expert(ids[t,k])(x_t)`` in float64 on ``hidden``'s device (pairs whose expert
    has slot -1 contribute nothing)."""
    out = torch.zeros(hidden.shape, dtype=torch.float64, device=hidden.device)
    table = slot_of_expert.long().cpu()
    ids = topk_ids.long()
    for expert in torch.unique(ids).tolist():
        slot = int(table[expert])
        if slot < 0:
            continue
        tok, j = torch.where(ids == expert)
        x = hidden[tok].double()
        z = x @ weights.gate_up[slot].double().T
        if weights.gate_up_bias is not None:
            z = z + weights.gate_up_bias[slot].double()
        y = _act_fp64(z, fmt) @ weights.down[slot].double().T
        if weights.down_bias is not None:
            y = y + weights.down_bias[slot].double()
        out.index_add_(0, tok, y * topk_weights[tok, j].double()[:, None])
    return out


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` in float64; inf when ``got`` has a NaN or inf."""
    got = got.double()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300))


# ------------------------------------------------------------------------------------- CPU tests
SMALL = [
    ExpertFormat(hidden=32, intermediate=16, dtype=torch.float32),
    ExpertFormat(hidden=24, intermediate=40, dtype=torch.float32, gated=False, activation="relu"),
    ExpertFormat(hidden=16, intermediate=24, dtype=torch.float32, activation="gpt_oss", has_bias=True, alpha=1.702, limit=0.5),
    ExpertFormat(hidden=16, intermediate=8, dtype=torch.float32, gated=False, activation="gelu"),
    ExpertFormat(hidden=16, intermediate=8, dtype=torch.float32, activation="gelu_tanh"),
]


@pytest.mark.parametrize("fmt", SMALL, ids=lambda f: f.activation + ("_bias" if f.has_bias else ""))
def test_oracle_matches_a_per_token_loop(fmt: ExpertFormat) -> None:
    gen = torch.Generator().manual_seed(0)
    _, views = make_slots(fmt, num_slots=7, device="cpu", gen=gen)
    ids, w = make_routing(9, 6, 2, gen, "cpu", dead_experts=1)
    table = make_slot_table(6, 7, gen, "cpu", missing=1)
    hidden = torch.randn(9, fmt.hidden, generator=gen)
    got = fused_experts_fp64(hidden, ids, w, table, views, fmt)
    # one token, one expert at a time, written from the format's docstring
    want = torch.zeros(9, fmt.hidden, dtype=torch.float64)
    for t in range(9):
        for j in range(2):
            s = int(table[ids[t, j]])
            if s < 0:
                continue
            z = views.gate_up[s].double() @ hidden[t].double()
            if fmt.has_bias:
                z = z + views.gate_up_bias[s].double()
            if fmt.activation == "gpt_oss":
                g, u = z[: fmt.intermediate].clamp(max=fmt.limit), z[fmt.intermediate :].clamp(-fmt.limit, fmt.limit)
                a = g * torch.sigmoid(fmt.alpha * g) * (u + 1)
            else:
                act = {"silu": torch.nn.functional.silu, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
                       "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh")}[fmt.activation]
                a = act(z[: fmt.intermediate]) * z[fmt.intermediate :] if fmt.gated else act(z)
            y = views.down[s].double() @ a
            if fmt.has_bias:
                y = y + views.down_bias[s].double()
            want[t] += w[t, j].double() * y
    assert rel_error(got, want) < 1e-12


@pytest.mark.parametrize("fmt", SMALL, ids=lambda f: f.activation + ("_bias" if f.has_bias else ""))
def test_cpu_dispatch_matches_oracle_and_accumulates(fmt: ExpertFormat) -> None:
    pytest.importorskip("sida_moe.kernels.reference")
    gen = torch.Generator().manual_seed(1)
    _, views = make_slots(fmt, num_slots=8, device="cpu", gen=gen)
    ids, w = make_routing(11, 8, 3, gen, "cpu", dead_experts=2)
    table = make_slot_table(8, 8, gen, "cpu", missing=2)
    hidden = torch.randn(11, fmt.hidden, generator=gen)
    ref = fused_experts_fp64(hidden, ids, w, table, views, fmt)
    got = fused_experts(hidden, ids, w, table, views, fmt)
    assert rel_error(got, ref) < 1e-5
    base = torch.randn(11, fmt.hidden, generator=gen)
    acc = fused_experts(hidden, ids, w, table, views, fmt, out=base.clone())
    assert rel_error(acc, ref + base.double()) < 1e-5


def test_bad_inputs_raise_clear_errors() -> None:
    fmt = SMALL[0]
    gen = torch.Generator().manual_seed(2)
    _, views = make_slots(fmt, num_slots=4, device="cpu", gen=gen)
    ids, w = make_routing(3, 4, 2, gen, "cpu")
    table = make_slot_table(4, 4, gen, "cpu")
    x = torch.randn(3, fmt.hidden, generator=gen)
    with pytest.raises(ValueError, match="hidden must be"):
        fused_experts(x[:, :-1], ids, w, table, views, fmt)
    with pytest.raises(TypeError, match="hidden must be"):
        fused_experts(x.double(), ids, w, table, views, fmt)
    with pytest.raises(ValueError, match="topk_ids must be"):
        fused_experts(x, ids[:2], w, table, views, fmt)
    with pytest.raises(TypeError, match="topk_ids must be int32 or int64"):
        fused_experts(x, ids.float(), w, table, views, fmt)
    with pytest.raises(ValueError, match="topk_weights must have"):
        fused_experts(x, ids, w[:, :1], table, views, fmt)
    with pytest.raises(TypeError, match="slot_of_expert must be int32"):
        fused_experts(x, ids, w, table.long(), views, fmt)
    with pytest.raises(ValueError, match="out must be"):
        fused_experts(x, ids, w, table, views, fmt, out=torch.zeros(2, fmt.hidden))
    wrong = ExpertFormat(hidden=fmt.hidden, intermediate=fmt.intermediate * 2, dtype=fmt.dtype)
    with pytest.raises(ValueError, match="weights.gate_up must be"):
        fused_experts(x, ids, w, table, views, wrong)


def test_the_table_path_checks_its_inputs_by_the_same_rules() -> None:
    from sida_moe.format import ExpertAddresses
    from sida_moe.kernels import fused_experts_table

    fmt = SMALL[0]
    gen = torch.Generator().manual_seed(3)
    ids, w = make_routing(3, 4, 2, gen, "cpu")
    x = torch.randn(3, fmt.hidden, generator=gen)
    table = ExpertAddresses(torch.zeros(4, dtype=torch.int64), {}, 0)
    with pytest.raises(ValueError, match="hidden must be"):
        fused_experts_table(x[:, :-1], ids, w, table, fmt)
    with pytest.raises(TypeError, match="hidden must be"):
        fused_experts_table(x.double(), ids, w, table, fmt)
    with pytest.raises(TypeError, match="topk_ids must be int32 or int64"):
        fused_experts_table(x, ids.float(), w, table, fmt)
    with pytest.raises(ValueError, match="topk_weights must have"):
        fused_experts_table(x, ids, w[:, :1], table, fmt)
    with pytest.raises(TypeError, match="table.base must be int64"):
        fused_experts_table(x, ids, w, ExpertAddresses(torch.zeros(4, dtype=torch.int32), {}, 0), fmt)
    with pytest.raises(ValueError, match="table.base must be a non-empty 1-D"):
        fused_experts_table(x, ids, w, ExpertAddresses(torch.zeros(0, dtype=torch.int64), {}, 0), fmt)
    with pytest.raises(ValueError, match="out must be"):
        fused_experts_table(x, ids, w, table, fmt, out=torch.zeros(2, fmt.hidden))
