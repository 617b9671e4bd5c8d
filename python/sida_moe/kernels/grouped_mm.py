"""PyTorch's grouped GEMM over slot-sorted rows: the tensor-core path for many tokens.

``torch.nn.functional.grouped_mm`` (newer PyTorch) or ``torch._grouped_mm`` (2.8+) computes, for
groups ``g`` of consecutive rows ending at ``offs[g]``, ``x[rows of g] @ b[g]``. The slot views
(``[S, N, K]``, slot stride = slot size) are passed transposed, as ``[S, K, N]`` column-major, without
a copy; rows past ``offs[-1]`` are neither read nor written.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# torch's grouped GEMM refuses more groups than this ("Can't process more than 1024 groups"):
# layers whose slot memory has more slots use the streaming kernels.
MAX_GROUPS = 1024

_fn_cache: dict[str, Callable[..., torch.Tensor] | None] = {}
_failed: dict[int, str] = {}  # device index -> why grouped_mm was given up there


def grouped_mm_function() -> Callable[..., torch.Tensor] | None:
    """The grouped GEMM this PyTorch provides, or None."""
    if "fn" not in _fn_cache:
        fn = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
        _fn_cache["fn"] = fn
    return _fn_cache["fn"]


def grouped_mm_usable(device: torch.device, num_groups: int = 1) -> bool:
    """True when a grouped GEMM exists for this CUDA device (sm80+), takes ``num_groups`` groups
    (one per slot) and has not failed on the device."""
    if device.type != "cuda" or grouped_mm_function() is None or num_groups > MAX_GROUPS:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch.cuda.get_device_capability(index) < (8, 0):
        return False
    return index not in _failed


def mark_failed(device: torch.device, reason: str) -> None:
    """Stop using grouped_mm on this device (it rejected our strided slot views)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    _failed[index] = reason


def grouped_linear(x: torch.Tensor, w_slots: torch.Tensor, group_end: torch.Tensor) -> torch.Tensor:
    """``y[r] = w_slots[g(r)] @ x[r]`` for the rows of each group; ``x`` [M, K] row-major,
    ``w_slots`` [S, N, K] (row-major matrices at any 16-byte-aligned slot stride), ``group_end`` [S]
    int32 inclusive row ends. Returns [M, N] in ``x``'s dtype; rows past ``group_end[-1]`` undefined."""
    fn = grouped_mm_function()
    if fn is None:
        raise RuntimeError("this PyTorch has neither torch.nn.functional.grouped_mm nor torch._grouped_mm")
    return fn(x, w_slots.transpose(-2, -1), offs=group_end)


__all__ = ["MAX_GROUPS", "grouped_linear", "grouped_mm_function", "grouped_mm_usable", "mark_failed"]
