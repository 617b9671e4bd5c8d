"""The predictor's configuration (``PredictorConfig``, saved beside its weights as
``predictor.json``): the network's sizes and the variant it was trained as."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

WEIGHTS_NAME = "predictor.safetensors"
CONFIG_NAME = "predictor.json"


@dataclass
class PredictorConfig:
    """Sizes of a hash-function network, derived from the served model's config."""

    input_dim: int  # the model's hidden size (embedding width)
    num_moe_layers: int
    num_experts: int
    top_k: int  # experts per token of the served model
    hidden: int = 256
    lstm_layers: int = 2
    head_hidden: int = 0  # 0: the paper's linear heads; > 0: a per-layer MLP head of this width
    prev_token_routing: bool = False  # also input the previous token's true routing (decode variant)
    conditioned: bool = False
    attn_blocks: int = 0  # > 0: causal transformer blocks on top of the paper's features (deep variant)
    attn_heads: int = 8  # heads of those blocks (hidden must divide by it)
    # per MoE layer: weight of the next-layer gate's logits in the fused correction ([]: not fitted)
    gate_weights: list[float] = field(default_factory=list)
    lookahead_hidden: int = 0  # > 0: the lookahead heads' width (module docstring); 0: none
    lookahead_previous_token: bool = False  # the heads also read the previous token's state (docstring)
    dropout: float = 0.0  # training only: on the compressed input, each block's branches and the features
    # per MoE layer: temperature of the predicted weights in hash routing ([]: 1; train.fit_weight_temperature)
    weight_temperature: list[float] = field(default_factory=list)
    moe_layer_ids: list[int] = field(default_factory=list)  # decoder-layer index of each MoE layer
    model_type: str = ""
    # tokens ahead whose routing it predicts from the tokens so far: 0 (each token's own) or 1 (the
    # next token's: research, TrainConfig.target_shift; the prefetcher serves both, hash routing 0)
    target_shift: int = 0

    def __post_init__(self) -> None:
        for name in ("input_dim", "num_moe_layers", "num_experts", "top_k", "hidden", "lstm_layers"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"PredictorConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if int(self.head_hidden) < 0:
            raise ValueError(f"PredictorConfig.head_hidden must be >= 0 (0: linear heads), got {self.head_hidden!r}")
        if int(self.lookahead_hidden) < 0:
            raise ValueError(f"PredictorConfig.lookahead_hidden must be >= 0 (0: none), got {self.lookahead_hidden!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"PredictorConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if int(self.attn_blocks) < 0:
            raise ValueError(f"PredictorConfig.attn_blocks must be >= 0 (0: the paper's network), got {self.attn_blocks!r}")
        if self.attn_blocks and (int(self.attn_heads) <= 0 or self.hidden % self.attn_heads):
            raise ValueError(
                f"PredictorConfig.attn_heads must be a positive divisor of hidden ({self.hidden}), got {self.attn_heads!r}"
            )
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        if isinstance(self.target_shift, bool) or self.target_shift not in (0, 1):
            raise ValueError(f"PredictorConfig.target_shift must be 0 (each token's own routing) or 1 (the next "
                             f"token's), got {self.target_shift!r}")
        if self.moe_layer_ids and len(self.moe_layer_ids) != self.num_moe_layers:
            raise ValueError(
                f"moe_layer_ids has {len(self.moe_layer_ids)} entries but num_moe_layers is {self.num_moe_layers}"
            )
        if not self.moe_layer_ids:
            self.moe_layer_ids = list(range(self.num_moe_layers))
        if self.weight_temperature and (len(self.weight_temperature) != self.num_moe_layers
                                        or not all(t > 0 for t in self.weight_temperature)):
            raise ValueError(f"weight_temperature must hold one positive temperature per MoE layer "
                             f"({self.num_moe_layers}), got {self.weight_temperature!r}")
        if self.gate_weights and len(self.gate_weights) != self.num_moe_layers:
            raise ValueError(
                f"gate_weights has {len(self.gate_weights)} entries but num_moe_layers is {self.num_moe_layers}"
            )

    def require_own_routing(self, user: str) -> None:
        """ValueError naming ``user`` (something that refines or routes by a token's own predicted
        experts) for a predictor of the next token's routing (``target_shift=1``)."""
        if self.target_shift:
            raise ValueError(f"{user} needs a predictor of each token's own routing; this one predicts the next "
                             f"token's (target_shift=1)")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> PredictorConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown predictor config keys {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**data)


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PredictorConfig"]
