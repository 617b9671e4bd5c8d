"""The next token of a decode step, greedy or sampled, computed on the device without a host sync
so that it is part of the captured step.

Sampling repeats transformers' ``do_sample=True`` path op for op: the float32 logits divided by
the temperature, top-k (every token below the k-th best score masked), top-p (ascending sort,
tokens whose cumulative probability is at most 1 - p masked, the best always kept), softmax, and
the draw ``torch.multinomial`` makes for one sample -- ``argmax(p / q)`` with ``q`` drawn by
``exponential_`` over the whole ``[B, V]`` -- without multinomial's host-side check of the
probabilities, which a captured step cannot run. The parameters live in device tensors of the
step, so one captured step serves calls with any values. With the same seed and the same logits
the draws are transformers' own (eager steps; a replayed step draws from the device generator
the same way, advanced per replay).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """``do_sample=True`` settings of one call (transformers' meanings; ``top_k=0`` and
    ``top_p=1.0`` switch that filter off)."""

    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r} "
                             "(for greedy decoding use do_sample=False)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: no top-k filter), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1: no top-p filter), got {self.top_p!r}")


class SamplerState:
    """A captured step's sampling parameters on the device, rewritten before each call."""

    def __init__(self, device: torch.device) -> None:
        self.temperature = torch.ones(1, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(1, dtype=torch.long, device=device)
        # 1 - top_p, computed in Python's float as transformers does before comparing in float32
        self.top_p_rest = torch.zeros(1, dtype=torch.float32, device=device)

    def set(self, params: SamplingParams) -> None:
        self.temperature.fill_(float(params.temperature))
        self.top_k.fill_(params.top_k)
        self.top_p_rest.fill_(1 - float(params.top_p))


def next_tokens(logits: torch.Tensor, sampler: SamplerState | None) -> torch.Tensor:
    """``[B, 1]`` next tokens from the last position's ``logits [B, V]``: the argmax when
    ``sampler`` is None, else a draw (module docstring)."""
    if sampler is None:
        return logits.argmax(dim=-1, keepdim=True)
    probs = sampling_probs(logits, sampler)
    return (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1, keepdim=True)


def sampling_probs(logits: torch.Tensor, sampler: SamplerState) -> torch.Tensor:
    """``[B, V]`` float32 probability of each token under ``sampler``: what :func:`next_tokens`
    draws from (transformers' warpers, then softmax)."""
    scores = logits.float() / sampler.temperature
    vocab = scores.shape[-1]
    # top-k; k = 0 keeps all
    k = torch.where(sampler.top_k > 0, sampler.top_k.clamp(max=vocab), vocab)
    kth = scores.sort(dim=-1, descending=True).values.gather(-1, (k - 1).expand(scores.shape[0], 1))
    scores = scores.masked_fill(scores < kth, float("-inf"))
    # top-p; p = 1 masks only what is already masked
    ordered, order = torch.sort(scores, descending=False)
    remove = ordered.softmax(dim=-1).cumsum(dim=-1) <= sampler.top_p_rest
    remove[..., -1:] = False
    scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scores.softmax(dim=-1)


__all__ = ["SamplerState", "SamplingParams", "next_tokens", "sampling_probs"]
