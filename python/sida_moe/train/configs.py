"""The settings of the predictor's training (``TrainConfig``, its presets, the width rule) and of
the lookahead heads' (``LookaheadConfig``): plain data, so the command line builds its options
from them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


def _device_type(device: object) -> str:
    """"cuda" for "cuda", "cuda:1" or torch.device("cuda", 1); the same for other device types."""
    return str(device).split(":", 1)[0]


#: the widest predictor the scaling rule gives (the width measured best on the reference model, d=512)
MAX_SCALED_HIDDEN = 512


def scaled_widths(input_dim: int) -> tuple[int, int]:
    """``(hidden, head_hidden)`` of the best-measured predictor for a model of hidden size ``input_dim``.

    Measured best on the reference model (d=512): width 512 with 256-wide MLP heads, i.e. as wide as
    the embeddings it reads, heads half that. The rule keeps those ratios: the width is ``input_dim``
    rounded up to a power of two, between 64 and 512 (larger models keep 512, the widest measured),
    and the heads half of it. A d=128 model gets 128 / 64: about 0.8M parameters instead of 9.6M at
    512, more than its own dense weights."""
    if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim <= 0:
        raise ValueError(f"input_dim must be a positive int, got {input_dim!r}")
    hidden = min(MAX_SCALED_HIDDEN, max(64, 1 << (input_dim - 1).bit_length()))
    return hidden, hidden // 2


#: named training configurations; ``TrainConfig.preset(name)``, ``sida-moe train-predictor --preset``.
#: ``best`` (the defaults): the variant measured best on the reference model (NOTES.md, README:
#: top-k target, distillation weight 0.5, MLP heads, 2 causal transformer blocks, batch 128 at lr
#: 1.5e-3, bf16 autocast on a GPU), widths scaled to the model (``scaled_widths``).
#: ``paper``: SiDA-MoE's network (width 256, linear heads, no blocks) and loss (top-1 cross-entropy
#: plus 0.005 x truncated KD), batch 64, at lr 1e-3 (the paper's 5e-5 is far too slow for a budget of
#: minutes, NOTES.md; pass ``lr=5e-5`` for it).
TRAIN_PRESETS: dict[str, dict] = {
    "best": dict(target="topk", kd_weight=0.5, hidden=None, head_hidden=None, attn_blocks=2, batch_size=128,
                 lr=1.5e-3, bf16=None),
    "paper": dict(target="top1", kd_weight=0.005, hidden=256, head_hidden=0, attn_blocks=0, batch_size=64,
                  lr=1e-3, bf16=False),
}

@dataclass
class TrainConfig:
    """Optimisation settings. Defaults: the ``best`` preset (``TRAIN_PRESETS``); ``TrainConfig.preset
    ("paper")`` gives the paper's network and loss."""

    # None: 2000 steps, or, with max_seconds, as many as fit in it; an int caps the run either way
    steps: int | None = None
    batch_size: int = 128  # sequences per step
    lr: float = 1.5e-3  # paper: 5e-5; 1e-3..2e-3 with cosine decay converges in far fewer steps (see NOTES.md)
    weight_decay: float = 0.01
    warmup_steps: int = 100
    kd_weight: float = 0.5  # paper: 0.005; 0.5 calibrates the predicted weights (NOTES.md)
    top_t: int = 30
    target: Literal["top1", "topk"] = "topk"  # paper: top1
    hidden: int | None = None  # predictor width; None: scaled to the model (scaled_widths); the paper's is 256
    head_hidden: int | None = None  # > 0: per-layer MLP heads of this width, 0: linear heads; None: scaled
    attn_blocks: int = 2  # > 0: causal transformer blocks on top of the paper's features (deep variant)
    attn_heads: int = 8  # heads of those blocks (must divide the width)
    # dropout in the network while training (HashPredictor.dropout; not saved): against overfitting a
    # small corpus; off by default, since it lowered held-out recall where it was measured (NOTES.md)
    dropout: float = 0.0
    fit_gate: bool = True  # the trace holds the next-layer gate: fit the fused correction's weights
    fit_temperature: bool = True  # fit hash routing's per-layer weight temperature (fit_weight_temperature)
    grad_clip: float = 1.0
    # 0: each token's own routing; 1: the next token's, from the tokens up to this one (research,
    # PredictorConfig.target_shift): a prediction made at the end of a decode step then names the
    # step its copies land for (the prefetcher hands it over so); hash routing refuses it
    target_shift: int = 0
    seed: int = 0
    device: str = "cpu"
    max_seconds: float | None = None  # wall-clock cap: the step count is cut to fit after 20 steps
    # bf16 autocast for the forward (GPU only; the loss and AdamW's master weights stay float32). The
    # LSTM is most of a step and runs about twice as fast in bf16 (NOTES.md).
    # None: on when training on a GPU.
    bf16: bool | None = None

    @classmethod
    def preset(cls, name: str, **overrides) -> TrainConfig:
        """The configuration ``TRAIN_PRESETS[name]``, with ``overrides`` on top."""
        if name not in TRAIN_PRESETS:
            raise ValueError(f"unknown predictor preset {name!r}; presets: {', '.join(TRAIN_PRESETS)}")
        return cls(**{**TRAIN_PRESETS[name], **overrides})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "top_t", "hidden"):
            value = getattr(self, name)
            if value is None and name in ("steps", "hidden"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.head_hidden is not None and self.head_hidden < 0:
            raise ValueError(f"head_hidden must be >= 0 (0: linear heads) or None (scaled), got {self.head_hidden}")
        if self.attn_blocks < 0:
            raise ValueError(f"attn_blocks must be >= 0 (0: the paper's network), got {self.attn_blocks}")
        if self.attn_blocks and (self.attn_heads <= 0 or (self.hidden is not None and self.hidden % self.attn_heads)):
            raise ValueError(f"attn_heads must be a positive divisor of hidden ({self.hidden}), got {self.attn_heads}")
        if self.bf16 and _device_type(self.device) != "cuda":
            raise ValueError(f"bf16=True needs a CUDA training device, got device={self.device!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive or None, got {self.max_seconds}")
        if self.kd_weight < 0:
            raise ValueError(f"kd_weight must be >= 0, got {self.kd_weight}")
        if self.target not in ("top1", "topk"):
            raise ValueError(f"target must be 'top1' or 'topk', got {self.target!r}")
        if isinstance(self.target_shift, bool) or self.target_shift not in (0, 1):
            raise ValueError(f"target_shift must be 0 (each token's own routing) or 1 (the next token's), "
                             f"got {self.target_shift!r}")

    def widths(self, input_dim: int) -> tuple[int, int]:
        """``(hidden, head_hidden)`` for a model of hidden size ``input_dim``: the given ones, or
        ``scaled_widths`` for those left None."""
        hidden, head_hidden = scaled_widths(input_dim)
        hidden = self.hidden if self.hidden is not None else hidden
        if self.head_hidden is not None:
            head_hidden = self.head_hidden
        elif self.hidden is not None:
            head_hidden = self.hidden // 2
        return hidden, head_hidden

    def use_bf16(self) -> bool:
        return self.bf16 if self.bf16 is not None else _device_type(self.device) == "cuda"


@dataclass
class LookaheadConfig:
    """Settings of ``train_lookahead``. The heads are small (about ``(d + E) * hidden`` weights per
    layer) and a step is one batched matmul over all layers, so thousands of steps take seconds."""

    hidden: int = 1024  # width of each layer's head (wider heads recalled more; NOTES.md)
    steps: int = 4000
    batch_tokens: int = 4096  # tokens per step (every layer of each)
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    kd_weight: float = 0.5
    top_t: int = 30
    target: Literal["top1", "topk"] = "topk"
    seed: int = 0
    device: str = "cpu"
    max_seconds: float | None = None  # wall-clock cap on the steps
    previous_dropout: float = 0.1  # share of training tokens whose previous-token state is zeroed (prompts)

    def __post_init__(self) -> None:
        for name in ("hidden", "steps", "batch_tokens", "top_t"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LookaheadConfig.{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.kd_weight < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("kd_weight, weight_decay and warmup_steps must be >= 0")
        if self.target not in ("top1", "topk"):
            raise ValueError(f"target must be 'top1' or 'topk', got {self.target!r}")
        if not 0.0 <= self.previous_dropout < 1.0:
            raise ValueError(f"previous_dropout must be in [0, 1), got {self.previous_dropout}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive or None, got {self.max_seconds}")


__all__ = ["MAX_SCALED_HIDDEN", "TRAIN_PRESETS", "LookaheadConfig", "TrainConfig", "scaled_widths"]
