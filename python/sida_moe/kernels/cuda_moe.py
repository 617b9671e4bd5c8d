"""One MoE layer on the GPU, straight from the slot views: launch wrappers of cuda/moe_kernels.cu.

No host synchronisation anywhere (every buffer size follows from ``T``, ``k``, the slot count and the
block size), all work on PyTorch's current stream: a call can be captured in a CUDA graph once the
kernels are compiled (the first call compiles them). Callers go through ``sida_moe.kernels.fused_experts``.

Per call: ``moe_align`` sorts the pairs by slot; then ``gemv`` (CUDA cores) or ``mma`` (tensor cores)
kernels stream the touched experts' weights for blocks of sorted rows, or ``gather_rows`` +
torch grouped_mm + ``act_rows`` + grouped_mm do it for many tokens; ``moe_reduce_*`` sums each
token's pairs in k order (deterministic) into the output.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from sida_moe.format import ExpertAddresses, ExpertFormat, SlotWeights
from sida_moe.kernels import grouped_mm as gmm
from sida_moe.kernels.configs import LaunchPlan, choose_plan, device_crossovers
from sida_moe.kernels.cuda_build import KernelModule, cupy_import_error, load_module
from sida_moe.kernels.moe_align import AlignedPairs, align_pairs_torch, max_padded_rows

SOURCE = "moe_kernels.cu"
WARPS = 4  # warps per GEMV block (WARPS in moe_kernels.cu)
ALIGN_THREADS = 1024
# moe_align keeps two ints per slot in dynamic shared memory, next to ~260 B of static shared memory
# (warp sums); past 48 KiB the launcher opts in to the device's per-block maximum (227 KiB on Hopper).
_ALIGN_STATIC_SMEM = 1024


@functools.lru_cache(maxsize=None)
def align_max_slots(device: torch.device | int) -> int:
    """Most slots the ``moe_align`` kernel takes on ``device`` (its shared memory holds one counter per slot); past it the
    PyTorch version sorts the pairs."""
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    return (optin - _ALIGN_STATIC_SMEM) // 8


_ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "gpt_oss": 4}
_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1}



def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _aligned16(t: torch.Tensor | None) -> bool:
    """Address and slot (first-dimension) stride are multiples of 16 bytes."""
    return t is None or (t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0)


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


@dataclass
class _ShapeKernels:
    """Compiled kernels of one expert shape class on one device, with its launch geometry."""

    mod: KernelModule
    has_mma: bool
    grid_y: dict[tuple[str, str], int]  # (regime, stage) -> row groups per sorted block
    fns: dict[str, object]


_shape_kernels: dict[tuple[ExpertFormat, int], _ShapeKernels] = {}


def _down_rows_per_warp(intermediate: int) -> int:
    vpl = (intermediate // 8 + 31) // 32  # RPW_DOWN in moe_kernels.cu
    return 4 if vpl <= 2 else (2 if vpl <= 4 else 1)


def kernel_module(fmt: ExpertFormat, device_index: int) -> KernelModule:
    """The compiled kernels for one expert shape class on one device."""
    return _kernels(fmt, device_index).mod


def _kernels(fmt: ExpertFormat, device_index: int) -> _ShapeKernels:
    key = (fmt, device_index)
    sk = _shape_kernels.get(key)
    if sk is not None:
        return sk
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
    mod = load_module(SOURCE, defines, device_index)
    h, i = fmt.hidden, fmt.intermediate
    grid_y = {
        ("gemv", "gate_up"): -(-i // (WARPS * (1 if fmt.gated else 2))),
        ("gemv", "down"): -(-h // (WARPS * _down_rows_per_warp(i))),
        ("mma", "gate_up"): i // (16 if fmt.gated else 32),  # one row tile per block, K split over warps
        ("mma", "down"): h // 32,
    }
    sk = _ShapeKernels(mod=mod, has_mma=h % 32 == 0 and i % 32 == 0, grid_y=grid_y, fns={})
    _shape_kernels[key] = sk
    return sk


def align_pairs_cuda(
    mod: KernelModule,
    topk_ids: torch.Tensor,
    slot_of_expert: torch.Tensor,
    num_slots: int,
    block_m: int,
    stream: int,
) -> AlignedPairs:
    """``moe_align`` kernel (one block); same result as ``align_pairs_torch`` up to the order of
    pairs within a slot. Falls back to the PyTorch version past ``align_max_slots`` slots."""
    if num_slots > align_max_slots(mod.device_index):
        return align_pairs_torch(topk_ids, slot_of_expert, num_slots, block_m)
    num_pairs = topk_ids.numel()
    max_padded = max_padded_rows(num_pairs, num_slots, block_m)
    max_blocks = max_padded // block_m
    # one allocation: group_end | sorted_ids | block_slot | pair_pos | total (group_end first: it is
    # grouped_mm's offs tensor, kept at the allocation's alignment)
    ws = torch.empty(num_slots + max_padded + max_blocks + num_pairs + 1, dtype=torch.int32, device=topk_ids.device)
    group_end, sorted_ids, block_slot, pair_pos, total = torch.split(ws, [num_slots, max_padded, max_blocks, num_pairs, 1])
    base = ws.data_ptr()
    out_ptrs = [int(base + 4 * o) for o in (num_slots, num_slots + max_padded, num_slots + max_padded + max_blocks)]
    out_ptrs += [int(base), int(base + 4 * (num_slots + max_padded + max_blocks + num_pairs))]
    mod.launch(
        "moe_align",
        (1,),
        (ALIGN_THREADS,),
        (
            int(topk_ids.data_ptr()),
            int(topk_ids.dtype == torch.int64),
            int(slot_of_expert.data_ptr()),
            int(slot_of_expert.shape[0]),
            int(num_pairs),
            int(num_slots),
            int(block_m),
            int(max_padded),
            *out_ptrs,  # sorted_ids, block_slot, pair_pos, group_end, total_padded
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
    num_tokens = hidden.shape[0]
    top_k = topk_ids.shape[1]

    result = out
    accumulate = out is not None
    if out is not None and (out.stride(1) != 1 or out.data_ptr() % 16 or (out.stride(0) * out.element_size()) % 16):
        result = None  # compute into a fresh buffer and add below
    if result is None:
        result = torch.empty((num_tokens, fmt.hidden), dtype=fmt.dtype, device=device)
    if num_tokens == 0:
        return out if out is not None else result

    index = device.index
    switch = index != torch.cuda.current_device()
    if switch:
        prev = torch.cuda.current_device()
        torch.cuda.set_device(index)
    try:
        stream = torch.cuda.current_stream(device).cuda_stream
        sk = _kernels(fmt, index)
        if not hidden.is_contiguous():
            hidden = hidden.contiguous()
        if not topk_ids.is_contiguous():
            topk_ids = topk_ids.contiguous()
        if topk_weights.dtype != torch.float32 or not topk_weights.is_contiguous():
            topk_weights = topk_weights.to(torch.float32).contiguous()
        if not slot_of_expert.is_contiguous():
            slot_of_expert = slot_of_expert.contiguous()
        if plan is None:
            grouped_ok = gmm.grouped_mm_usable(device, weights.num_slots)
            plan = choose_plan(num_tokens, top_k, slot_of_expert.shape[0], grouped_ok, sk.has_mma, device_crossovers(index))
        elif plan.regime == "mma" and not sk.has_mma:
            raise ValueError(f"the mma regime needs hidden and intermediate sizes that are multiples of 32, got {fmt}")
        elif plan.regime == "grouped_mm" and weights.num_slots > gmm.MAX_GROUPS:
            raise ValueError(f"the grouped_mm regime takes at most {gmm.MAX_GROUPS} slots (one group each), got {weights.num_slots}")
        in_place = accumulate and result is out
        num_pairs = topk_ids.numel()
        aligned = align_pairs_cuda(sk.mod, topk_ids, slot_of_expert, weights.num_slots, plan.block_m, stream)
        if plan.regime == "grouped_mm":
            try:
                _grouped_mm_layer(sk, hidden, aligned, topk_weights, weights, fmt, result, in_place, top_k, stream)
            except _GroupedMMRejected as exc:
                gmm.mark_failed(device, str(exc.__cause__))
                warnings.warn(
                    f"sida_moe: torch grouped_mm failed on {device} ({exc.__cause__}); using the streaming kernels "
                    "for every token count there (slower for prefill)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                plan = LaunchPlan("mma", 32) if sk.has_mma else LaunchPlan("gemv", 16)
                aligned = align_pairs_cuda(sk.mod, topk_ids, slot_of_expert, weights.num_slots, plan.block_m, stream)
        if plan.regime != "grouped_mm":
            _streaming_layer(sk, plan.regime, hidden, aligned, topk_weights, weights.addresses, fmt, result, in_place,
                             top_k, num_pairs, stream)
    finally:
        if switch:
            torch.cuda.set_device(prev)

    if accumulate and result is not out:
        out.add_(result)
        return out
    return result


_identity: dict[tuple[int, int], torch.Tensor] = {}


def _identity_slots(num_experts: int, device: torch.device) -> torch.Tensor:
    """``slot_of_expert`` of an expert table: entry e of the table is expert e."""
    key = (num_experts, device.index)
    t = _identity.get(key)
    if t is None:
        t = _identity[key] = torch.arange(num_experts, dtype=torch.int32, device=device)
    return t


def fused_experts_table_cuda(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    table: ExpertAddresses,
    fmt: ExpertFormat,
    out: torch.Tensor | None = None,
    plan: LaunchPlan | None = None,
) -> torch.Tensor:
    """``fused_experts_table`` on the streaming kernels (gemv / mma): weights are read wherever
    ``table.base[e]`` points (a slot in HBM, or the expert's pinned pool record, read through its
    unified address). No host synchronisation, capturable in a CUDA graph."""
    device = hidden.device
    num_tokens, top_k = hidden.shape[0], topk_ids.shape[1]
    result = out
    accumulate = out is not None
    if out is not None and (out.stride(1) != 1 or out.data_ptr() % 16 or (out.stride(0) * out.element_size()) % 16):
        result = None
    if result is None:
        result = torch.empty((num_tokens, fmt.hidden), dtype=fmt.dtype, device=device)
    if num_tokens == 0:
        return out if out is not None else result
    stream = torch.cuda.current_stream(device).cuda_stream
    sk = _kernels(fmt, device.index)
    hidden = hidden if hidden.is_contiguous() else hidden.contiguous()
    topk_ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    if topk_weights.dtype != torch.float32 or not topk_weights.is_contiguous():
        topk_weights = topk_weights.to(torch.float32).contiguous()
    num_experts = table.base.shape[0]
    if plan is None:
        plan = choose_plan(num_tokens, top_k, num_experts, False, sk.has_mma, device_crossovers(device.index))
    elif plan.regime == "grouped_mm":
        raise ValueError("the expert table runs the streaming regimes (gemv, mma), not grouped_mm")
    elif plan.regime == "mma" and not sk.has_mma:
        raise ValueError(f"the mma regime needs hidden and intermediate sizes that are multiples of 32, got {fmt}")
    aligned = align_pairs_cuda(sk.mod, topk_ids, _identity_slots(num_experts, device), num_experts, plan.block_m, stream)
    in_place = accumulate and result is out
    _streaming_layer(sk, plan.regime, hidden, aligned, topk_weights, table, fmt, result, in_place, top_k,
                     topk_ids.numel(), stream)
    if accumulate and result is not out:
        out.add_(result)
        return out
    return result


def _streaming_layer(
    sk: _ShapeKernels,
    regime: str,
    hidden: torch.Tensor,
    aligned: AlignedPairs,
    topk_weights: torch.Tensor,
    addresses: ExpertAddresses,
    fmt: ExpertFormat,
    result: torch.Tensor,
    accumulate: bool,
    top_k: int,
    num_pairs: int,
    stream: int,
) -> None:
    """gemv / mma regimes: gate_up + activation into fp32 rows, down + bias into fp32 rows, reduce."""
    bm = aligned.block_m
    max_padded = aligned.sorted_ids.shape[0]
    nblocks = aligned.max_blocks
    inter, hidden_size = fmt.intermediate, fmt.hidden
    # one fp32 allocation: activations [max_padded, I] | expert outputs [max_padded, H]
    ws = torch.empty(max_padded * (inter + hidden_size), dtype=torch.float32, device=hidden.device)
    act_ptr = ws.data_ptr()
    y_ptr = act_ptr + max_padded * inter * 4
    base = _ptr(addresses.base)
    sorted_ids, block_slot, total = _ptr(aligned.sorted_ids), _ptr(aligned.block_slot), _ptr(aligned.total_padded)
    sk.mod.launch(
        f"{regime}_gate_up_bm{bm}",
        (nblocks, sk.grid_y[(regime, "gate_up")]),
        (WARPS * 32,),
        (
            _ptr(hidden),
            sorted_ids,
            block_slot,
            total,
            base,
            addresses.offset("gate_up"),
            addresses.offset("gate_up_bias"),
            int(act_ptr),
            int(top_k),
            int(num_pairs),
        ),
        stream,
    )
    sk.mod.launch(
        f"{regime}_down_bm{bm}",
        (nblocks, sk.grid_y[(regime, "down")]),
        (WARPS * 32,),
        (
            int(act_ptr),
            sorted_ids,
            block_slot,
            total,
            base,
            addresses.offset("down"),
            addresses.offset("down_bias"),
            int(y_ptr),
            int(num_pairs),
        ),
        stream,
    )
    sk.mod.launch(
        "moe_reduce_f32",
        (result.shape[0], -(-hidden_size // (8 * 128))),
        (128,),
        (
            int(y_ptr),
            _ptr(aligned.pair_pos),
            _ptr(topk_weights),
            _ptr(result),
            int(result.stride(0)),
            int(top_k),
            int(accumulate),
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
    sk: _ShapeKernels,
    hidden: torch.Tensor,
    aligned: AlignedPairs,
    topk_weights: torch.Tensor,
    weights: SlotWeights,
    fmt: ExpertFormat,
    result: torch.Tensor,
    accumulate: bool,
    top_k: int,
    stream: int,
) -> None:
    """grouped_mm regime: gather sorted rows, grouped GEMM, activation, grouped GEMM, reduce."""
    device = hidden.device
    mod = sk.mod
    rows = aligned.sorted_ids.shape[0]  # == num_pairs (block_m = 1)
    xs = torch.empty((rows, fmt.hidden), dtype=fmt.dtype, device=device)
    mod.launch(
        "gather_rows",
        (rows,),
        (128,),
        (_ptr(hidden), _ptr(aligned.sorted_ids), _ptr(aligned.total_padded), _ptr(xs), int(top_k)),
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
            int(gu_bias.stride(0) if gu_bias is not None else 0),
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
            int(dn_bias.stride(0) if dn_bias is not None else 0),
            _ptr(result),
            int(result.stride(0)),
            int(top_k),
            int(accumulate),
        ),
        stream,
    )


__all__ = [
    "align_max_slots",
    "align_pairs_cuda",
    "fused_experts_cuda",
    "fused_experts_table_cuda",
    "kernel_module",
    "unsupported_reason",
]
