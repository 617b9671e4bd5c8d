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
from sida_moe.kernels.inputs import check_slot_inputs, check_table_inputs

_warned: set[str] = set()

# SIDA_MOE_KERNELS (sida_moe.environment), checked at import rather than at the first layer call
_KERNELS = environment().kernels


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
    check_slot_inputs(hidden, topk_ids, topk_weights, slot_of_expert, weights, fmt, out)
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
    from sida_moe.kernels.reference import slot_experts_reference

    return slot_experts_reference(hidden, topk_ids, topk_weights, slot_of_expert, weights, fmt, out)


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
    check_table_inputs(hidden, topk_ids, topk_weights, table, fmt, out)
    if hidden.device.type == "cuda":
        if not table_kernels_usable(hidden.device, fmt):
            raise RuntimeError("the expert-table path needs the CUDA streaming kernels (bf16/fp16 experts, CuPy)")
        from sida_moe.kernels import cuda_moe

        return cuda_moe.fused_experts_table_cuda(hidden, topk_ids, topk_weights, table, fmt, out)
    from sida_moe.kernels.reference import fused_experts_table_reference

    return fused_experts_table_reference(hidden, topk_ids, topk_weights, table, fmt, out)


__all__ = ["fused_experts", "fused_experts_table", "table_kernels_usable"]
