"""Sparsemax (Martins & Astudillo, 2016): the Euclidean projection of scores onto the simplex.

Like softmax it returns a probability vector, but entries below a data-dependent threshold are
exactly zero, so the predictor's self-attention looks at a few positions only.
"""

from __future__ import annotations

import torch


def sparsemax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax of ``scores`` along ``dim``: ``max(z - tau(z), 0)`` with ``tau`` chosen so the
    result sums to 1.

    Computed in float32 (returned in the input's dtype). Masked positions should be given a large
    finite negative score (e.g. ``-1e9``), not ``-inf``; they then receive exactly 0. Differentiable
    through autograd (the gradient of the sort-based formula is sparsemax's Jacobian).
    """
    if not scores.is_floating_point():
        raise TypeError(f"sparsemax needs floating-point scores, got {scores.dtype}")
    if scores.numel() == 0:
        return scores.clone()
    in_dtype = scores.dtype
    last = dim in (-1, scores.dim() - 1)
    z = scores.float() if last else scores.float().transpose(dim, -1)
    # Subtracting the max changes nothing mathematically and keeps the cumulative sums small.
    z = z - z.max(dim=-1, keepdim=True).values
    z_sorted, _ = torch.sort(z, dim=-1, descending=True)
    n = z.shape[-1]
    k = torch.arange(1, n + 1, device=z.device, dtype=z.dtype)
    cumsum = z_sorted.cumsum(dim=-1)
    # Support: the largest k with 1 + k * z_(k) > sum_{j<=k} z_(j).
    in_support = (1 + k * z_sorted) > cumsum
    support_size = in_support.sum(dim=-1, keepdim=True).clamp(min=1)
    tau = (cumsum.gather(-1, support_size - 1) - 1) / support_size.to(z.dtype)
    out = torch.clamp(z - tau, min=0.0)
    return (out if last else out.transpose(dim, -1)).to(in_dtype)


__all__ = ["sparsemax"]
