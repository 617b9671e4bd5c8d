"""One MoE layer on the GPU, straight from the slot views: launch wrappers of cuda/moe_kernels.cu.

No host synchronisation anywhere (every buffer size follows from ``T``, ``k``, the slot count and the
block size), all work on PyTorch's current stream: a call can be captured in a CUDA graph once the
kernels are compiled (the first call compiles them). Callers go through ``sida_moe.kernels.fused_experts``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from sida_moe.format import ExpertFormat, SlotWeights
from sida_moe.kernels import grouped_mm as gmm
from sida_moe.kernels.configs import LaunchPlan, choose_plan
from sida_moe.kernels.cuda_build import KernelModule, cupy_import_error, load_module
from sida_moe.kernels.moe_align import AlignedPairs, align_pairs_torch, max_padded_rows

SOURCE = "moe_kernels.cu"
WARPS = 4  # warps per GEMV block (WARPS in moe_kernels.cu)
ALIGN_THREADS = 1024
# moe_align keeps two ints per slot in shared memory (48 KiB without opting in to more).
ALIGN_MAX_SLOTS = 48 * 1024 // 8
_ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "gpt_oss": 4}
_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1}

_NULL = np.uint64(0)


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return _NULL if t is None else np.uint64(t.data_ptr())


def _aligned16(t: torch.Tensor | None, slot_stride: bool = True) -> bool:
    if t is None:
        return True
    if t.data_ptr() % 16:
        return False
    return not slot_stride or (t.stride(0) * t.element_size()) % 16 == 0


def unsupported_reason(hidden: torch.Tensor, weights: SlotWeights, fmt: ExpertFormat) -> str | None:
    """Why these (already validated) inputs cannot run on the CUDA kernels, or None when they can."""
    if hidden.device.type != "cuda":
        return "the inputs are not on a CUDA device"
    if fmt.dtype not in _DTYPE_CODES:
        return f"the kernels take bf16 or fp16 experts, not {fmt.dtype}"
    if fmt.hidden % 8 or fmt.intermediate % 8:
        return f"hidden ({fmt.hidden}) and intermediate ({fmt.intermediate}) sizes must be multiples of 8"
    for name in ("gate_up", "down"):
        w = getattr(weights, name)
        if w.stride(2) != 1 or w.stride(1) != w.shape[2]:
            return f"slot view {name} must have row-major matrices, got strides {tuple(w.stride())}"
    for name in ("gate_up", "down", "gate_up_bias", "down_bias"):
        if not _aligned16(getattr(weights, name)):
            return f"slot view {name} is not 16-byte aligned (address or slot stride)"
    err = cupy_import_error()
    if err is not None:
        return f"CuPy with NVRTC is not usable ({err}); install sida-moe[cuda12] or sida-moe[cuda13]"
    return None


def kernel_module(fmt: ExpertFormat, device_index: int) -> KernelModule:
    """The compiled kernels for one expert shape class on one device."""
    defines: dict[str, int | float | str] = {
        "SIDA_DTYPE": _DTYPE_CODES[fmt.dtype],
        "SIDA_H": fmt.hidden,
        "SIDA_I": fmt.intermediate,
        "SIDA_GATED": int(fmt.gated),
        "SIDA_ACT": _ACT_CODES[fmt.activation],
    }
    if fmt.activation == "gpt_oss":
        defines["SIDA_ALPHA"] = f"{float(fmt.alpha)!r}f"
        defines["SIDA_LIMIT"] = f"{float(fmt.limit)!r}f"
    return load_module(SOURCE, defines, device_index)


def _down_rows_per_warp(intermediate: int) -> int:
    vpl = (intermediate // 8 + 31) // 32  # RPW_DOWN in moe_kernels.cu
    return 4 if vpl <= 2 else (2 if vpl <= 4 else 1)


def align_pairs_cuda(
    mod: KernelModule,
    topk_ids: torch.Tensor,
    slot_of_expert: torch.Tensor,
    num_slots: int,
    block_m: int,
    stream: int,
) -> AlignedPairs:
    """``moe_align`` kernel (one block); same result as ``align_pairs_torch`` up to the order of
    pairs within a slot. Falls back to the PyTorch version past ``ALIGN_MAX_SLOTS`` slots."""
    if num_slots > ALIGN_MAX_SLOTS:
        return align_pairs_torch(topk_ids, slot_of_expert, num_slots, block_m)
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    max_padded = max_padded_rows(num_pairs, num_slots, block_m)
    i32 = torch.int32
    sorted_ids = torch.empty(max_padded, dtype=i32, device=device)
    block_slot = torch.empty(max_padded // block_m, dtype=i32, device=device)
    pair_pos = torch.empty(num_pairs, dtype=i32, device=device)
    group_end = torch.empty(max(num_slots, 1), dtype=i32, device=device)[:num_slots]
    total = torch.empty(1, dtype=i32, device=device)
    mod.launch(
        "moe_align",
        (1,),
        (ALIGN_THREADS,),
        (
            _ptr(topk_ids),
            np.int32(topk_ids.dtype == torch.int64),
            _ptr(slot_of_expert),
            np.int32(slot_of_expert.shape[0]),
            np.int32(num_pairs),
            np.int32(num_slots),
            np.int32(block_m),
            np.int32(max_padded),
            _ptr(sorted_ids),
            _ptr(block_slot),
            _ptr(pair_pos),
            _ptr(group_end),
            _ptr(total),
        ),
        stream,
        shared_mem=2 * 4 * num_slots,
    )
    return AlignedPairs(sorted_ids, block_slot, pair_pos, group_end, total, block_m)


def fused_experts_cuda(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    slot_of_expert: torch.Tensor,
    weights: SlotWeights,
    fmt: ExpertFormat,
    out: torch.Tensor | None = None,
    plan: LaunchPlan | None = None,
) -> torch.Tensor:
    """``fused_experts`` on the CUDA kernels (inputs already validated and supported, see
    ``unsupported_reason``). ``plan`` overrides the regime choice of ``configs.choose_plan``."""
    device = hidden.device
    num_tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    num_slots = weights.num_slots
    inter = fmt.intermediate

    result = out
    accumulate = out is not None
    if out is not None and (out.stride(1) != 1 or not _aligned16(out) or out.data_ptr() % 16):
        result = None  # compute into a fresh buffer and add below
    if result is None:
        result = torch.empty((num_tokens, hidden_size), dtype=fmt.dtype, device=device)
    if num_tokens == 0:
        return out if out is not None else result

    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        mod = kernel_module(fmt, device.index if device.index is not None else torch.cuda.current_device())
        hidden = hidden.contiguous()
        topk_ids = topk_ids.contiguous()
        weights_f32 = topk_weights.to(torch.float32).contiguous()
        slot_of_expert = slot_of_expert.to(torch.int32).contiguous()
        if plan is None:
            plan = choose_plan(num_tokens, top_k, slot_of_expert.shape[0], gmm.grouped_mm_usable(device))
        aligned = align_pairs_cuda(mod, topk_ids, slot_of_expert, num_slots, plan.block_m, stream)
        num_pairs = topk_ids.numel()
        in_place = accumulate and result is out
        if plan.regime == "grouped_mm":
            try:
                _grouped_mm_layer(mod, hidden, aligned, weights_f32, weights, fmt, result, in_place, top_k, num_pairs, stream)
            except _GroupedMMRejected as exc:
                gmm.mark_failed(device, str(exc.__cause__))
                warnings.warn(
                    f"sida_moe: torch grouped_mm failed on {device} ({exc.__cause__}); using the GEMV kernels "
                    "for every token count there (slower for prefill)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                plan = LaunchPlan("gemv", 16)
                aligned = align_pairs_cuda(mod, topk_ids, slot_of_expert, num_slots, plan.block_m, stream)
        if plan.regime == "gemv":
            _gemv_layer(mod, hidden, aligned, weights_f32, weights, fmt, inter, result, in_place, top_k, num_pairs, stream)

    if accumulate and result is not out:
        out.add_(result)
        return out
    return result


def _gemv_layer(
    mod: KernelModule,
    hidden: torch.Tensor,
    aligned: AlignedPairs,
    topk_weights: torch.Tensor,
    weights: SlotWeights,
    fmt: ExpertFormat,
    inter: int,
    result: torch.Tensor,
    accumulate: bool,
    top_k: int,
    num_pairs: int,
    stream: int,
) -> None:
    device = hidden.device
    bm = aligned.block_m
    max_padded = aligned.sorted_ids.shape[0]
    nblocks = aligned.max_blocks
    hidden_size = fmt.hidden
    act = torch.empty((max_padded, inter), dtype=torch.float32, device=device)
    y = torch.empty((max_padded, hidden_size), dtype=torch.float32, device=device)
    gu_bias, dn_bias = weights.gate_up_bias, weights.down_bias
    cols_per_warp = 1 if fmt.gated else 2
    mod.launch(
        f"gemv_gate_up_bm{bm}",
        (nblocks, -(-inter // (WARPS * cols_per_warp))),
        (WARPS * 32,),
        (
            _ptr(hidden),
            _ptr(aligned.sorted_ids),
            _ptr(aligned.block_slot),
            _ptr(aligned.total_padded),
            _ptr(weights.gate_up),
            np.int64(weights.gate_up.stride(0)),
            _ptr(gu_bias),
            np.int64(gu_bias.stride(0) if gu_bias is not None else 0),
            _ptr(act),
            np.int32(top_k),
            np.int32(num_pairs),
        ),
        stream,
    )
    mod.launch(
        f"gemv_down_bm{bm}",
        (nblocks, -(-hidden_size // (WARPS * _down_rows_per_warp(inter)))),
        (WARPS * 32,),
        (
            _ptr(act),
            _ptr(aligned.sorted_ids),
            _ptr(aligned.block_slot),
            _ptr(aligned.total_padded),
            _ptr(weights.down),
            np.int64(weights.down.stride(0)),
            _ptr(dn_bias),
            np.int64(dn_bias.stride(0) if dn_bias is not None else 0),
            _ptr(y),
            np.int32(num_pairs),
        ),
        stream,
    )
    mod.launch(
        "moe_reduce_f32",
        (result.shape[0], -(-hidden_size // (8 * 128))),
        (128,),
        (
            _ptr(y),
            _ptr(aligned.pair_pos),
            _ptr(topk_weights),
            _ptr(result),
            np.int64(result.stride(0)),
            np.int32(top_k),
            np.int32(accumulate),
        ),
        stream,
    )


class _GroupedMMRejected(RuntimeError):
    """PyTorch's grouped GEMM refused our operands (e.g. the strided slot views)."""


def _grouped_linear(x: torch.Tensor, w_slots: torch.Tensor, group_end: torch.Tensor) -> torch.Tensor:
    try:
        return gmm.grouped_linear(x, w_slots, group_end)
    except (RuntimeError, NotImplementedError) as exc:
        raise _GroupedMMRejected("grouped_mm rejected the slot views") from exc


def _grouped_mm_layer(
    mod: KernelModule,
    hidden: torch.Tensor,
    aligned: AlignedPairs,
    topk_weights: torch.Tensor,
    weights: SlotWeights,
    fmt: ExpertFormat,
    result: torch.Tensor,
    accumulate: bool,
    top_k: int,
    num_pairs: int,
    stream: int,
) -> None:
    device = hidden.device
    rows = aligned.sorted_ids.shape[0]  # == num_pairs (block_m = 1)
    xs = torch.empty((rows, fmt.hidden), dtype=fmt.dtype, device=device)
    mod.launch(
        "gather_rows",
        (rows,),
        (128,),
        (_ptr(hidden), _ptr(aligned.sorted_ids), _ptr(aligned.total_padded), _ptr(xs), np.int32(top_k)),
        stream,
    )
    h = _grouped_linear(xs, weights.gate_up, aligned.group_end)
    a = torch.empty((rows, fmt.intermediate), dtype=fmt.dtype, device=device)
    gu_bias, dn_bias = weights.gate_up_bias, weights.down_bias
    mod.launch(
        "act_rows",
        (rows,),
        (128,),
        (
            _ptr(h),
            _ptr(aligned.block_slot),
            _ptr(aligned.total_padded),
            _ptr(gu_bias),
            np.int64(gu_bias.stride(0) if gu_bias is not None else 0),
            _ptr(a),
        ),
        stream,
    )
    y = _grouped_linear(a, weights.down, aligned.group_end)
    mod.launch(
        "moe_reduce_half",
        (result.shape[0], -(-fmt.hidden // (8 * 128))),
        (128,),
        (
            _ptr(y),
            _ptr(aligned.pair_pos),
            _ptr(topk_weights),
            _ptr(aligned.block_slot),
            _ptr(dn_bias),
            np.int64(dn_bias.stride(0) if dn_bias is not None else 0),
            _ptr(result),
            np.int64(result.stride(0)),
            np.int32(top_k),
            np.int32(accumulate),
        ),
        stream,
    )


__all__ = [
    "ALIGN_MAX_SLOTS",
    "align_pairs_cuda",
    "fused_experts_cuda",
    "kernel_module",
    "unsupported_reason",
]
