"""The PyTorch reference of ``sida_moe.kernels.fused_experts``: correct on CPU and GPU, the test oracle.

It follows Hugging Face's eager experts loop operation by operation (experts in ascending id order,
``linear -> act -> linear``, routing weight multiplied in float32 then rounded to the model dtype,
``index_add_`` into the output), so an offloaded model reproduces the original's numbers. It loops
over the resident experts in Python and syncs the host once per call: fine as an oracle and a CPU
path, not a fast GPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sida_moe.format import ExpertAddresses, ExpertFormat, ExpertTensors, SlotWeights
from sida_moe.kernels.inputs import check_slot_inputs


def _activate(z: torch.Tensor, fmt: ExpertFormat) -> torch.Tensor:
    """``act(gate_up @ x + b)`` of the canonical layout (gate rows first, then up rows)."""
    if fmt.gated:
        gate, up = z[..., : fmt.intermediate], z[..., fmt.intermediate :]
        if fmt.activation == "gpt_oss":
            # GPT-OSS clamped SwiGLU: (up + 1) * gate * sigmoid(alpha * gate), with clamps
            gate = gate.clamp(min=None, max=fmt.limit)
            up = up.clamp(min=-fmt.limit, max=fmt.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * fmt.alpha))
        return _plain_activation(gate, fmt) * up
    return _plain_activation(z, fmt)


def _plain_activation(z: torch.Tensor, fmt: ExpertFormat) -> torch.Tensor:
    if fmt.activation == "silu":
        return F.silu(z)
    if fmt.activation == "gelu":
        return F.gelu(z)
    if fmt.activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if fmt.activation == "relu":
        return F.relu(z)
    raise ValueError(f"activation {fmt.activation!r} is not a plain activation")


def fused_experts_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    slot_of_expert: torch.Tensor,
    weights: SlotWeights,
    fmt: ExpertFormat,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as :func:`sida_moe.kernels.fused_experts` (see there)."""
    check_slot_inputs(hidden, topk_ids, topk_weights, slot_of_expert, weights, fmt, out)
    return slot_experts_reference(hidden, topk_ids, topk_weights, slot_of_expert, weights, fmt, out)


def slot_experts_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    slot_of_expert: torch.Tensor,
    weights: SlotWeights,
    fmt: ExpertFormat,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`fused_experts_reference` on inputs already checked (``check_slot_inputs``)."""
    if out is None:
        out = torch.zeros_like(hidden)
    if hidden.shape[0] == 0:
        return out
    ids = topk_ids.long()
    table = slot_of_expert.to(device=ids.device, dtype=torch.long)
    num_experts = table.shape[0]
    if bool(((ids < 0) | (ids >= num_experts)).any()):
        raise ValueError(f"topk_ids out of range [0, {num_experts})")
    slots = table[ids]  # [T, k], -1 where the expert is not resident in this call
    ids_by_k = ids.t()
    resident = torch.unique(ids[slots >= 0]).tolist()  # ascending, like HF's loop over expert_hit
    for expert in resident:
        slot = int(table[expert])
        tensors = ExpertTensors(
            weights.gate_up[slot],
            weights.down[slot],
            weights.gate_up_bias[slot] if weights.gate_up_bias is not None else None,
            weights.down_bias[slot] if weights.down_bias is not None else None,
        )
        _add_expert(out, hidden, ids_by_k, expert, topk_weights, tensors, fmt)
    return out


def _add_expert(
    out: torch.Tensor,
    hidden: torch.Tensor,
    ids_by_k: torch.Tensor,
    expert: int,
    topk_weights: torch.Tensor,
    w: ExpertTensors,
    fmt: ExpertFormat,
) -> None:
    """``out[t] += weight * expert(hidden[t])`` for the pairs routed to ``expert``, in HF's order."""
    k_pos, token_idx = torch.where(ids_by_k == expert)  # HF's order: by k, then token
    x = hidden[token_idx]
    # biases added after rounding the product, as Hugging Face's GPT-OSS does (x @ W + b)
    z = F.linear(x, w.gate_up)
    if w.gate_up_bias is not None:
        z = z + w.gate_up_bias
    y = F.linear(_activate(z, fmt), w.down)
    if w.down_bias is not None:
        y = y + w.down_bias
    y = y.float() * topk_weights[token_idx, k_pos, None].float()
    out.index_add_(0, token_idx, y.to(out.dtype))


def fused_experts_table_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    table: ExpertAddresses,
    fmt: ExpertFormat,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fused_experts_table`` on the host backend: each expert's weights are read wherever its
    table entry points (a slot or its pool record, both host memory). Same numbers as
    :func:`fused_experts_reference` over slots holding the same experts."""
    if out is None:
        out = torch.zeros_like(hidden)
    if hidden.shape[0] == 0:
        return out
    ids = topk_ids.long()
    num_experts = table.base.shape[0]
    if bool((ids >= num_experts).any()):
        raise ValueError(f"topk_ids out of range [0, {num_experts})")
    ids_by_k = ids.t()
    for expert in torch.unique(ids[ids >= 0]).tolist():  # negative ids: pairs to skip
        w = table.tensors_at(int(table.base[expert]), fmt)
        _add_expert(out, hidden, ids_by_k, expert, topk_weights, w, fmt)
    return out


__all__ = ["fused_experts_reference", "fused_experts_table_reference"]
