"""The next token of a decode step, greedy or sampled, computed on the device without a host sync
so that it is part of the captured step.

Sampling follows transformers' warpers for ``do_sample=True``: temperature, then top-k (every
token tied with the k-th best kept), then top-p (the smallest set of most likely tokens whose
mass reaches p), then a draw from what remains. The parameters live in device tensors of the
step, so one captured step serves calls with any values; the draw is the exponential race
(``argmax(p / q)`` with ``q ~ Exp(1)``, which picks token i with probability p_i), so it needs no
``multinomial``. Draws come from the device's default generator: ``torch.manual_seed`` makes a
run repeatable, but the random stream is not transformers', so sampled text differs from its
``generate`` token by token while following the same distribution.
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
        self.top_p = torch.ones(1, dtype=torch.float32, device=device)

    def set(self, params: SamplingParams) -> None:
        self.temperature.fill_(float(params.temperature))
        self.top_k.fill_(params.top_k)
        self.top_p.fill_(float(params.top_p))


def next_tokens(logits: torch.Tensor, sampler: SamplerState | None) -> torch.Tensor:
    """``[B, 1]`` next tokens from the last position's ``logits [B, V]``: the argmax when
    ``sampler`` is None, else a draw (module docstring)."""
    if sampler is None:
        return logits.argmax(dim=-1, keepdim=True)
    probs, order = _filtered(logits, sampler)
    # a zero draw of q would divide 0 by 0 for a filtered token
    q = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(probs.dtype).tiny)
    return order.gather(-1, (probs / q).argmax(dim=-1, keepdim=True))


def sampling_probs(logits: torch.Tensor, sampler: SamplerState) -> torch.Tensor:
    """``[B, V]`` probability of each token under ``sampler`` (what :func:`next_tokens` draws
    from), in the vocabulary's order."""
    probs, order = _filtered(logits, sampler)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.empty_like(probs).scatter_(-1, order, probs)


def _filtered(logits: torch.Tensor, sampler: SamplerState) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised probabilities after temperature, top-k and top-p, in descending order of
    score, and that order."""
    scores = logits.float() / sampler.temperature
    vocab = scores.shape[-1]
    ordered, order = scores.sort(dim=-1, descending=True)
    # top-k: keep what is at least the k-th best score (ties with it too); k = 0 keeps all
    k = torch.where(sampler.top_k > 0, sampler.top_k.clamp(max=vocab), vocab)
    kth = ordered.gather(-1, (k - 1).expand(ordered.shape[0], 1))
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = ordered.softmax(dim=-1)
    # top-p: drop a token once the mass before it reaches p (the best one always stays)
    drop = (probs.cumsum(dim=-1) - probs) >= sampler.top_p
    drop[:, 0] = False
    return probs.masked_fill(drop, 0.0), order


__all__ = ["SamplerState", "SamplingParams", "next_tokens", "sampling_probs"]
