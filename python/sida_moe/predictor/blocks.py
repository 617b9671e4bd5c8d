"""The predictor's building blocks beside its LSTM: a causal transformer block over the tokens so
far (``CausalBlock``) and the lookahead heads that refine the next layer's prediction from the
current layer's input (``LookaheadHeads``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalBlock(nn.Module):
    """One pre-norm transformer block of the deep variant: causal multi-head self-attention over the
    sequence (with past keys/values for decode) and a GELU MLP, each added to its input."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp_in = nn.Linear(dim, 4 * dim)
        self.mlp_out = nn.Linear(4 * dim, dim)

    def empty_past(self, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        dim = self.out.in_features
        empty = torch.zeros(batch, self.heads, 0, dim // self.heads, device=device, dtype=dtype)
        return empty, empty.clone()

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor], allowed: torch.Tensor | None,
        dropout: float = 0.0,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x [B, S, D]``; ``allowed [B, S, P+S]`` bool (None: plain causal, or one decode token
        that may see every key); ``dropout`` on each branch's output (training). Returns the new
        ``x`` and the keys/values including these tokens."""
        bsz, seq, dim = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(bsz, seq, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        keys, values = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if allowed is not None:
            att = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed[:, None])
        else:
            # seq > 1 without past or mask: causal; seq == 1: the one query sees every key
            att = F.scaled_dot_product_attention(q, keys, values, is_causal=seq > 1)
        x = x + F.dropout(self.out(att.transpose(1, 2).reshape(bsz, seq, dim)), dropout)
        x = x + F.dropout(self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x)))), dropout)
        return x, (keys, values)


class LookaheadHeads(nn.Module):
    """Per MoE layer l, a correction of the run-ahead logits from the state before it -- layer
    l-1's router input (layer 0: the token's embedding) -- and the previous token's router input
    of layer L-2 (``model.py``'s docstring). Weights of all layers are stacked (``[L, ...]``) so
    training runs every layer in one batched matmul; decode corrects one layer at a time
    (``layer``)."""

    def __init__(self, input_dim: int, num_moe_layers: int, num_experts: int, hidden: int) -> None:
        super().__init__()
        self.input_dim = input_dim
        L, fan_in = num_moe_layers, 2 * input_dim + num_experts
        self.w_in = nn.Parameter(torch.randn(L, fan_in, hidden) * fan_in**-0.5)
        self.b_in = nn.Parameter(torch.zeros(L, hidden))
        self.w_out = nn.Parameter(torch.zeros(L, hidden, num_experts))  # zero: starts as the run-ahead logits
        self.b_out = nn.Parameter(torch.zeros(L, num_experts))

    @staticmethod
    def _rms(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def _inputs(self, moe_input: torch.Tensor, logits: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        base = logits.float()
        if previous is None:  # unknown: zeros
            previous = torch.zeros(*base.shape[:-1], self.input_dim, device=base.device)
        else:  # [..., d] or one row per token shared by every layer
            previous = self._rms(previous).expand(*base.shape[:-1], self.input_dim)
        return torch.cat([self._rms(moe_input), previous, base - base.mean(-1, keepdim=True)], dim=-1)

    def forward(self, moe_inputs: torch.Tensor, logits: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """Every layer at once: ``moe_inputs [L, N, d]`` (the state before each layer), the
        run-ahead ``logits [L, N, E]`` and ``previous [N, d]`` (None: unknown, zeros) -> corrected
        logits ``[L, N, E]``."""
        z = self._inputs(moe_inputs, logits, previous)
        mid = F.gelu(torch.baddbmm(self.b_in[:, None], z, self.w_in))
        return logits.float() + torch.baddbmm(self.b_out[:, None], mid, self.w_out)

    def layer(self, layer: int, moe_input: torch.Tensor, logits: torch.Tensor,
              previous: torch.Tensor | None = None) -> torch.Tensor:
        """MoE layer ``layer``: ``moe_input [..., d]`` (the state before it), ``logits [..., E]``
        and ``previous [..., d]`` or None."""
        z = self._inputs(moe_input, logits, previous)
        mid = F.gelu(torch.addmm(self.b_in[layer], z.reshape(-1, z.shape[-1]), self.w_in[layer]))
        out = torch.addmm(self.b_out[layer], mid, self.w_out[layer])
        return logits.float() + out.view(*logits.shape[:-1], -1)


__all__ = ["CausalBlock", "LookaheadHeads"]
