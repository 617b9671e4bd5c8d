"""Checks of an expert-compute call's inputs, shared by every implementation (the dispatch in
``sida_moe.kernels`` and the reference), so each bad input gets one exception class and message."""

from __future__ import annotations

import torch

from sida_moe.format import ExpertAddresses, ExpertFormat, SlotWeights


def _check_routing(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   fmt: ExpertFormat, out: torch.Tensor | None) -> None:
    """What every path takes: the tokens, their routing and the output to accumulate into."""
    if hidden.dim() != 2 or hidden.shape[1] != fmt.hidden:
        raise ValueError(f"hidden must be [T, {fmt.hidden}] (T tokens, H = fmt.hidden), got {tuple(hidden.shape)}")
    if hidden.dtype != fmt.dtype:
        raise TypeError(f"hidden must be {fmt.dtype} (fmt.dtype), got {hidden.dtype}")
    num_tokens = hidden.shape[0]
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must be [T={num_tokens}, k>=1], got {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}")
    if not topk_weights.dtype.is_floating_point:
        raise TypeError(f"topk_weights must be a floating-point tensor, got {topk_weights.dtype}")
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, hidden on {hidden.device}")
    if out is not None:
        if tuple(out.shape) != (num_tokens, fmt.hidden) or out.dtype != fmt.dtype or out.device != hidden.device:
            raise ValueError(
                f"out must be a [{num_tokens}, {fmt.hidden}] {fmt.dtype} tensor on {hidden.device}, "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}"
            )


def check_slot_inputs(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    slot_of_expert: torch.Tensor,
    weights: SlotWeights,
    fmt: ExpertFormat,
    out: torch.Tensor | None,
) -> None:
    """The inputs of ``fused_experts``: ValueError for a wrong shape or device, TypeError for a
    wrong dtype (host-side only, no device synchronisation)."""
    _check_routing(hidden, topk_ids, topk_weights, fmt, out)
    if slot_of_expert.dim() != 1 or slot_of_expert.shape[0] < 1:
        raise ValueError(f"slot_of_expert must be a non-empty 1-D [E] tensor, got {tuple(slot_of_expert.shape)}")
    if slot_of_expert.dtype != torch.int32:
        raise TypeError(f"slot_of_expert must be int32, got {slot_of_expert.dtype}")
    num_slots = weights.num_slots
    expected = {
        "gate_up": (num_slots, fmt.gate_up_rows, fmt.hidden),
        "down": (num_slots, fmt.hidden, fmt.intermediate),
    }
    if fmt.has_bias:
        expected["gate_up_bias"] = (num_slots, fmt.gate_up_rows)
        expected["down_bias"] = (num_slots, fmt.hidden)
    for name in ("gate_up", "down", "gate_up_bias", "down_bias"):
        view = getattr(weights, name)
        if name not in expected:
            if view is not None:
                raise ValueError(f"weights.{name} is set but fmt.has_bias is False")
            continue
        if view is None:
            raise ValueError(f"weights.{name} is missing (fmt.has_bias is True)")
        if tuple(view.shape) != expected[name]:
            raise ValueError(f"weights.{name} must be {expected[name]}, got {tuple(view.shape)}")
        if view.dtype != fmt.dtype:
            raise TypeError(f"weights.{name} must be {fmt.dtype}, got {view.dtype}")
        if view.device != hidden.device:
            raise ValueError(f"weights.{name} is on {view.device}, hidden on {hidden.device}")
    if slot_of_expert.device != hidden.device:
        raise ValueError(f"slot_of_expert is on {slot_of_expert.device}, hidden on {hidden.device}")


def check_table_inputs(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       table: ExpertAddresses, fmt: ExpertFormat, out: torch.Tensor | None) -> None:
    """The inputs of ``fused_experts_table``, by the same rules as :func:`check_slot_inputs`."""
    _check_routing(hidden, topk_ids, topk_weights, fmt, out)
    base = table.base
    if base.dim() != 1 or base.shape[0] < 1:
        raise ValueError(f"table.base must be a non-empty 1-D [E] tensor, got {tuple(base.shape)}")
    if base.dtype != torch.int64:
        raise TypeError(f"table.base must be int64 (addresses), got {base.dtype}")
    if base.device != hidden.device:
        raise ValueError(f"table.base is on {base.device}, hidden on {hidden.device}")


__all__ = ["check_slot_inputs", "check_table_inputs"]
