"""The SiDA hash function: a small network that predicts every MoE layer's experts from the
token embeddings (the model's layer-0 input), before any layer runs.

Architecture (SiDA-MoE, section 3): Linear(d -> 256) + ReLU compression, a 2-layer LSTM (hidden
256), sparsemax self-attention over the sequence, a residual linear, and one Linear(256 -> E) head
per MoE layer. Decoder LMs need predictions on a prefix during generation, so the LSTM runs left
to right and the attention is causal; ``forward`` takes and returns a ``PredictorState`` so decode
steps cost one token's work.

Wider variant (``head_hidden > 0``): each layer's head is a small MLP,
``Linear(hidden -> head_hidden) + GELU + Linear(head_hidden -> E)``, instead of one linear map from
the features every layer shares.

Deep variant (``attn_blocks > 0``): that many pre-norm causal transformer blocks (multi-head
softmax self-attention + GELU MLP) on top of the paper's features, before the heads. The router of
MoE layer l reads a hidden state built by l attention layers over the context; one sparsemax
attention after an LSTM approximates that poorly (held-out recall stopped near 0.85 on the reference
model, the same on training text: too little capacity, not too little data). The LSTM below already
carries token order, so the blocks need no position encoding. Decode keeps each block's keys and
values in the state, so a step still costs one token's work.

Fused correction (``gate_weights``, fitted after training on traces that hold the next-layer
gate, see ``train.fit_gate_weights``): once MoE layer l-1 has run, layer l's router applied to
layer l-1's input (the "next-layer gate") is known; layer l's prediction becomes
``logits + gate_weights[l] * gate_logits``. Ranking per token only, so neither needs normalising.
Layer 0 has nothing before it and keeps the run-ahead prediction.

Lookahead heads (``lookahead_hidden > 0``, trained after the network on traces that hold router
inputs, see ``sida_moe.train.lookahead``): once MoE layer l-1 has run, its router input ``x``
(the token's real hidden state one layer behind; for layer 0, the token's embedding) is known, and
so is ``p``, the previous token's router input of MoE layer L-2 (the deepest state the heads read;
during decode it is known before the step starts). Layer l's prediction becomes
``logits + MLP_l([rms(x), rms(p), logits - mean])`` (``Linear(2d + E -> lookahead_hidden) + GELU +
Linear(-> E)``, the last layer zero-initialised so untrained heads change nothing). A learned map
of ``x``, unlike the fixed next-layer gate (layer l's router on ``x``), can model what layer l-1's
experts and layer l's attention do to the state; the run-ahead logits carry the context and ``p``
summarises it as the model itself sees it. Where ``p`` is unknown (a prompt's tokens, predicted
before any layer ran) it is zeros; training zeroes it for a share of tokens so that both cases are
learned.

Dropout (``dropout``, a training setting: ``sida_moe.train.TrainConfig.dropout``, not saved) acts on
the compressed input, each block's branches and the features, in training mode only.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sida_moe.predictor.blocks import CausalBlock, LookaheadHeads
from sida_moe.predictor.config import CONFIG_NAME, WEIGHTS_NAME, PredictorConfig
from sida_moe.predictor.sparsemax import sparsemax

_MASKED_SCORE = -1e9  # finite, so sparsemax gives masked keys exactly 0 without inf - inf = nan


@dataclass
class PredictorState:
    """Causal state carried between calls: LSTM (h, c) and the attention's past keys/values."""

    lstm: tuple[torch.Tensor, torch.Tensor]  # each [lstm_layers, B, hidden]
    keys: torch.Tensor  # [B, P, hidden]
    values: torch.Tensor  # [B, P, hidden]
    key_mask: torch.Tensor | None  # [B, P] bool, False for padding; None: every key is a real token
    # deep variant: each block's past (keys, values), each [B, heads, P, hidden / heads]
    blocks: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys.shape[1]


class HashPredictor(nn.Module):
    """Predicts router logits of every MoE layer from the layer-0 input embeddings."""

    def __init__(self, config: PredictorConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.config = config
        self.dropout = dropout
        h = config.hidden
        self.compress = nn.Linear(config.input_dim, h)
        self.lstm = nn.LSTM(h, h, num_layers=config.lstm_layers, batch_first=True)
        self.qkv = nn.Linear(h, 3 * h)  # query, key and value in one matmul
        self.residual = nn.Linear(h, h)
        L, E, hh = config.num_moe_layers, config.num_experts, config.head_hidden
        if hh == 0:
            # the per-layer Linear(256 -> E) heads, stored as one matrix: rows l*E .. (l+1)*E-1 are layer l's
            self.heads = nn.Linear(h, L * E)
        else:
            # per-layer MLP heads: the first linears as one matrix, the second as a batched [L, hh, E]
            self.heads = nn.Linear(h, L * hh)
            self.heads_out = nn.Parameter(torch.empty(L, hh, E))
            self.heads_out_bias = nn.Parameter(torch.zeros(L, E))
            nn.init.normal_(self.heads_out, std=hh**-0.5)
        self.blocks = nn.ModuleList(CausalBlock(h, config.attn_heads) for _ in range(config.attn_blocks))
        self.lookahead = (
            LookaheadHeads(config.input_dim, L, E, config.lookahead_hidden)
            if config.lookahead_hidden and L > 1 else None
        )

    @property
    def dropout(self) -> float:
        """Training-time dropout (module docstring); 0 after ``load``: it is not saved."""
        return self._dropout

    @dropout.setter
    def dropout(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {value!r}")
        self._dropout = float(value)

    def add_lookahead(self, hidden: int) -> LookaheadHeads:
        """Give the network (fresh, zero-output) lookahead heads of width ``hidden`` (module
        docstring), on its device; ``sida_moe.train.lookahead.train_lookahead`` trains them."""
        c = self.config
        if c.num_moe_layers < 2:
            raise ValueError("lookahead heads need at least 2 MoE layers (they read router inputs of layers 0..L-2)")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0:
            raise ValueError(f"lookahead hidden width must be a positive int, got {hidden!r}")
        heads = LookaheadHeads(c.input_dim, c.num_moe_layers, c.num_experts, hidden)
        self.lookahead = heads.to(self.compress.weight.device)
        c.lookahead_hidden = hidden
        return self.lookahead

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def empty_state(self, batch: int, device: torch.device | str | None = None) -> PredictorState:
        dev = torch.device(device) if device is not None else self.compress.weight.device
        dtype = self.compress.weight.dtype
        c = self.config
        zeros = torch.zeros(c.lstm_layers, batch, c.hidden, device=dev, dtype=dtype)
        empty = torch.zeros(batch, 0, c.hidden, device=dev, dtype=dtype)
        blocks = [block.empty_past(batch, dev, dtype) for block in self.blocks]
        return PredictorState((zeros, zeros.clone()), empty, empty.clone(), None, blocks)

    def features(
        self,
        embeds: torch.Tensor,
        state: PredictorState | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PredictorState]:
        """Shared 256-d features ``[B, S, hidden]`` for new tokens ``embeds`` ``[B, S, d]``.

        ``state`` holds the tokens seen before (None: a fresh sequence). ``attention_mask``
        ``[B, S]`` (1 = real token) masks padding out of the attention keys.
        """
        if embeds.dim() != 3 or embeds.shape[-1] != self.config.input_dim:
            raise ValueError(
                f"embeds must be [batch, seq, {self.config.input_dim}], got {tuple(embeds.shape)}"
            )
        bsz, seq, _ = embeds.shape
        if state is None:
            state = self.empty_state(bsz, embeds.device)
        if state.keys.shape[0] != bsz:
            raise ValueError(f"state is for batch {state.keys.shape[0]}, embeds have batch {bsz}")
        if len(state.blocks) != len(self.blocks):
            raise ValueError(f"state has {len(state.blocks)} blocks' keys/values, the predictor has {len(self.blocks)} blocks")
        x = embeds.to(self.compress.weight.dtype)
        # Scale-free input: embedding tables differ in scale between models (std 0.02 .. 1).
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        drop = self.dropout if self.training else 0.0
        x = F.dropout(torch.relu(self.compress(x)), drop)
        h, lstm_state = self.lstm(x, state.lstm)

        q, k, v = self.qkv(h).chunk(3, dim=-1)
        keys = torch.cat([state.keys, k], dim=1)
        values = torch.cat([state.values, v], dim=1)
        past = state.length
        key_mask = state.key_mask
        if attention_mask is not None or key_mask is not None:
            new_mask = (
                torch.ones(bsz, seq, dtype=torch.bool, device=embeds.device)
                if attention_mask is None
                else attention_mask.to(device=embeds.device).bool()
            )
            if key_mask is None:
                key_mask = torch.ones(bsz, past, dtype=torch.bool, device=embeds.device)
            key_mask = torch.cat([key_mask, new_mask], dim=1)
        scores = torch.matmul(q, keys.transpose(1, 2)).float() / math.sqrt(self.config.hidden)  # [B, S, P+S]
        if key_mask is None and seq == 1:
            allowed = None  # one new token, every key a real earlier token: nothing to mask (decode)
        else:
            q_pos = torch.arange(seq, device=embeds.device)[:, None] + past
            k_pos = torch.arange(past + seq, device=embeds.device)[None, :]
            allowed = (k_pos <= q_pos)[None]
            if key_mask is not None:
                allowed = allowed & key_mask[:, None, :]
                # A row with no allowed key (a padding query at position 0) attends to itself.
                allowed = allowed | ((k_pos == q_pos)[None] & ~allowed.any(-1, keepdim=True))
        if allowed is not None:
            scores = scores.masked_fill(~allowed, _MASKED_SCORE)
        attn = sparsemax(scores, dim=-1).to(values.dtype)
        feats = h + self.residual(torch.matmul(attn, values))
        # the blocks: plain causal attention (fast path) unless there is a past or padding to mask
        block_mask = allowed if allowed is not None and (past > 0 or key_mask is not None) else None
        blocks = []
        for block, block_past in zip(self.blocks, state.blocks):
            feats, kv = block(feats, block_past, block_mask, drop)
            blocks.append(kv)
        if drop:
            feats = F.dropout(feats, drop)
        return feats, PredictorState(lstm_state, keys, values, key_mask, blocks)

    def forward(
        self,
        embeds: torch.Tensor,
        state: PredictorState | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PredictorState]:
        """Base logits ``[L, B, S, E]`` for every MoE layer, and the state after these tokens."""
        feats, new_state = self.features(embeds, state, attention_mask)
        return self.head_logits(feats), new_state

    def head_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Every MoE layer's logits ``[L, B, S, E]`` from the shared features ``[B, S, hidden]``."""
        c = self.config
        L = c.num_moe_layers
        if c.head_hidden == 0:
            return self.heads(feats).view(*feats.shape[:2], L, c.num_experts).permute(2, 0, 1, 3)
        mid = torch.nn.functional.gelu(self.heads(feats)).view(*feats.shape[:2], L, c.head_hidden)
        return torch.einsum("bslh,lhe->lbse", mid, self.heads_out) + self.heads_out_bias[:, None, None, :]

    def fuse(self, logits: torch.Tensor, layer: int, gate_logits: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s logits ``[..., E]`` corrected with its router applied to the previous
        layer's input (``gate_logits [..., E]``), by the fitted ``gate_weights`` (module docstring)."""
        if not self.config.gate_weights:
            raise ValueError("this predictor has no fitted gate_weights (train it on a trace with the next-layer gate)")
        if not 0 <= layer < self.config.num_moe_layers:
            raise ValueError(f"layer must be in [0, {self.config.num_moe_layers}), got {layer}")
        weight = self.config.gate_weights[layer]
        if weight == 0.0:
            return logits
        return logits.float() + weight * gate_logits.to(logits.device).float()

    def weight_logits(self, logits: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer ``layer``'s logits scaled by its fitted ``weight_temperature`` (unchanged when none
        was fitted): hash routing's predicted weights are their softmax. Scaling keeps the ranking,
        so the chosen experts are the same."""
        temps = self.config.weight_temperature
        if not 0 <= layer < self.config.num_moe_layers:
            raise ValueError(f"layer must be in [0, {self.config.num_moe_layers}), got {layer}")
        return logits if not temps or temps[layer] == 1.0 else logits.float() / temps[layer]

    def look_ahead(self, logits: torch.Tensor, layer: int, moe_input: torch.Tensor,
                   previous: torch.Tensor | None = None) -> torch.Tensor:
        """Layer ``layer``'s logits ``[..., E]`` corrected by the lookahead heads with the state
        before it, ``moe_input [..., d]``: layer ``layer - 1``'s router input, or for layer 0 the
        token's embedding; ``previous [..., d]``: the previous token's router input of layer L-2
        (None: unknown, zeros) (module docstring)."""
        if self.lookahead is None:
            raise ValueError("this predictor has no lookahead heads (train them: sida_moe.train.lookahead)")
        if not 0 <= layer < self.config.num_moe_layers:
            raise ValueError(f"layer must be in [0, {self.config.num_moe_layers}), got {layer}")
        for name, t in (("moe_input", moe_input), ("previous", previous)):
            if t is not None and (t.shape[-1] != self.config.input_dim or t.shape[:-1] != logits.shape[:-1]):
                raise ValueError(f"{name} must be [..., {self.config.input_dim}] with the tokens of logits "
                                 f"{list(logits.shape[:-1])}, got {list(t.shape)}")
        dev = self.lookahead.w_in.device
        previous = None if previous is None else previous.to(dev)
        return self.lookahead.layer(layer, moe_input.to(dev), logits.to(dev), previous)

    def predict_topk(
        self, embeds: torch.Tensor, k: int | None = None, state: PredictorState | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, PredictorState]:
        """Top-k expert ids ``[L, B, S, k]`` and their logits, plus the new state (no grad)."""
        k = self.config.top_k if k is None else k
        if not 0 < k <= self.config.num_experts:
            raise ValueError(f"k must be in [1, {self.config.num_experts}], got {k}")
        with torch.no_grad():
            logits, new_state = self(embeds, state)
            vals, ids = logits.topk(k, dim=-1)
        return ids, vals, new_state

    # ------------------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``predictor.safetensors`` and ``predictor.json`` into ``directory``."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "sida-moe-predictor"})
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            f.write(self.config.to_json())

    @classmethod
    def load(cls, directory: str | os.PathLike, device: torch.device | str = "cpu") -> HashPredictor:
        """Load a predictor saved by ``save`` (e.g. next to a model's ``config.json``)."""
        from safetensors.torch import load_file

        cfg_path = os.path.join(directory, CONFIG_NAME)
        weights_path = os.path.join(directory, WEIGHTS_NAME)
        for p in (cfg_path, weights_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"no predictor at {directory!r}: missing {os.path.basename(p)}")
        with open(cfg_path) as f:
            config = PredictorConfig.from_dict(json.load(f))
        model = cls(config)
        model.load_state_dict(load_file(weights_path, device="cpu"))
        return model.to(device).eval()


def has_predictor(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a saved predictor."""
    return os.path.isfile(os.path.join(directory, CONFIG_NAME)) and os.path.isfile(os.path.join(directory, WEIGHTS_NAME))


__all__ = [
    "CONFIG_NAME",
    "CausalBlock",
    "WEIGHTS_NAME",
    "HashPredictor",
    "LookaheadHeads",
    "PredictorConfig",
    "PredictorState",
    "has_predictor",
]
