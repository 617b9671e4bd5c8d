"""Expert compute for one MoE layer, reading weights straight from the cache slots.

``fused_experts`` is the one entry point the experts module calls. It dispatches to the CUDA
gathered-GEMM kernels when they are available for the inputs, and to the PyTorch reference
implementation (the CPU path and the test oracle) otherwise: silently on the CPU and for fp32
experts, with a one-time warning when CUDA inputs cannot use the kernels (no CuPy, misaligned slots).
"""

from __future__ import annotations

import warnings

import torch

from sida_moe.environment import environment
from sida_moe.format import ExpertAddresses, ExpertFormat, SlotWeights

_warned: set[str] = set()

# SIDA_MOE_KERNELS (sida_moe.environment), checked at import rather than at the first layer call
_KERNELS = environment().kernels


def _check_inputs(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    slot_of_expert: torch.Tensor,
    weights: SlotWeights,
    fmt: ExpertFormat,
    out: torch.Tensor | None,
) -> None:
    """Host-side checks of shapes, dtypes and devices (no device synchronisation)."""
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
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights), ("slot_of_expert", slot_of_expert)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, hidden on {hidden.device}")
    if out is not None:
        if tuple(out.shape) != (num_tokens, fmt.hidden) or out.dtype != fmt.dtype or out.device != hidden.device:
            raise ValueError(
                f"out must be a [{num_tokens}, {fmt.hidden}] {fmt.dtype} tensor on {hidden.device}, "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}"
            )


def fused_experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    slot_of_expert: torch.Tensor,
    weights: SlotWeights,
    fmt: ExpertFormat,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compute ``out[t] (+)= sum_k topk_weights[t,k] * expert(topk_ids[t,k])(hidden[t])``.

    - ``hidden``: ``[T, H]`` in ``fmt.dtype``; ``topk_ids``: ``[T, k]`` integer expert ids of the
      layer; ``topk_weights``: ``[T, k]`` (any float dtype; used in fp32).
    - ``slot_of_expert``: ``[E]`` int32 on ``hidden``'s device, the slot holding each expert, or -1
      for experts not resident in this call; (t, k) pairs whose expert has no slot are skipped,
      which lets the caller process a layer in chunks of experts when they exceed the slots.
    - ``weights``: views of the slot memory (``sida_moe.format.slot_views``).
    - ``out``: when given, results are accumulated into it (``[T, H]``, ``fmt.dtype``) and it is
      returned; otherwise a new zero-initialised tensor is.

    On CUDA with CuPy installed this runs the gathered-GEMM kernels (no host synchronisation, CUDA-
    graph capturable once warmed up; expert ids outside ``[0, E)`` are skipped like slot -1 there,
    since checking them would need a sync). Raises ``ValueError`` / ``TypeError`` on inputs of the
    wrong shape, dtype or device.
    """
    _check_inputs(hidden, topk_ids, topk_weights, slot_of_expert, weights, fmt, out)
    if _KERNELS == "auto" and hidden.device.type == "cuda" and fmt.dtype in (torch.bfloat16, torch.float16):
        from sida_moe.kernels import cuda_moe

        reason = cuda_moe.unsupported_reason(hidden, weights, fmt)
        if reason is None:
            return cuda_moe.fused_experts_cuda(hidden, topk_ids, topk_weights, slot_of_expert, weights, fmt, out)
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(
                f"sida_moe: CUDA expert kernels unavailable, using the PyTorch reference path: {reason}",
                RuntimeWarning,
                stacklevel=2,
            )
    from sida_moe.kernels.reference import fused_experts_reference

    return fused_experts_reference(hidden, topk_ids, topk_weights, slot_of_expert, weights, fmt, out)


def table_kernels_usable(device: torch.device, fmt: ExpertFormat) -> bool:
    """Whether :func:`fused_experts_table` runs on ``device`` for ``fmt``: the host backend always
    (PyTorch reference), CUDA with the streaming kernels (bf16 / fp16, sizes multiple of 8, CuPy)."""
    if device.type == "cpu":
        return True
    if device.type != "cuda" or _KERNELS != "auto" or fmt.dtype not in (torch.bfloat16, torch.float16):
        return False
    from sida_moe.kernels.cuda_build import cupy_import_error

    return fmt.hidden % 8 == 0 and fmt.intermediate % 8 == 0 and cupy_import_error() is None


def fused_experts_table(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    table: ExpertAddresses,
    fmt: ExpertFormat,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Like :func:`fused_experts`, with each expert's weights read wherever ``table.base[e]``
    points: an engine's expert table (a GPU slot once its copy landed, else the expert's record
    in the pinned pool, read in place). The decode path: no host synchronisation on CUDA (the
    streaming kernels), nothing to acquire. Negative ids are pairs to skip. Needs
    :func:`table_kernels_usable`."""
    if hidden.dim() != 2 or hidden.shape[1] != fmt.hidden or hidden.dtype != fmt.dtype:
        raise ValueError(f"hidden must be a [T, {fmt.hidden}] {fmt.dtype} tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0] or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_ids and topk_weights must be [T={hidden.shape[0]}, k], got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    if table.base.dtype != torch.int64 or table.base.dim() != 1 or table.base.device != hidden.device:
        raise ValueError(f"table.base must be a 1-D int64 tensor on {hidden.device}, got "
                         f"{table.base.dtype} {tuple(table.base.shape)} on {table.base.device}")
    if hidden.device.type == "cuda":
        if not table_kernels_usable(hidden.device, fmt):
            raise RuntimeError("the expert-table path needs the CUDA streaming kernels (bf16/fp16 experts, CuPy)")
        from sida_moe.kernels import cuda_moe

        return cuda_moe.fused_experts_table_cuda(hidden, topk_ids, topk_weights, table, fmt, out)
    from sida_moe.kernels.reference import fused_experts_table_reference

    return fused_experts_table_reference(hidden, topk_ids, topk_weights, table, fmt, out)


__all__ = ["fused_experts", "fused_experts_table", "table_kernels_usable"]
