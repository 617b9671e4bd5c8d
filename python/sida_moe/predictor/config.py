"""The predictor's configuration (``PredictorConfig``, saved beside its weights as
``predictor.json``): the network's sizes and what was fitted after training. Training settings
(dropout, the loss, the optimiser) are ``sida_moe.train.TrainConfig``'s and are not saved here."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Callable

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
    attn_blocks: int = 0  # > 0: causal transformer blocks on top of the paper's features (deep variant)
    attn_heads: int = 8  # heads of those blocks (hidden must divide by it)
    # per MoE layer: weight of the next-layer gate's logits in the fused correction ([]: not fitted)
    gate_weights: list[float] = field(default_factory=list)
    lookahead_hidden: int = 0  # > 0: the lookahead heads' width (model.py's docstring); 0: none
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
        """The config saved as ``data`` (a ``predictor.json``). Fields that earlier versions saved
        and this one does not (``REMOVED_FIELDS``) are dropped when their value describes the
        network built now; a value that names a removed variant raises ValueError."""
        data = dict(data)
        for name, (loads, refusal) in REMOVED_FIELDS.items():
            if name in data:
                value = data.pop(name)
                if not loads(value, data):
                    raise ValueError(f"predictor config field {name}={value!r} {refusal}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown predictor config keys {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**data)


def _is_false(value: object, data: dict) -> bool:
    return value is False


def _previous_token_heads(value: object, data: dict) -> bool:
    # every lookahead head reads the previous token's state; without heads the flag meant nothing
    return value is True or not data.get("lookahead_hidden")


def _training_dropout(value: object, data: dict) -> bool:
    # a training setting (TrainConfig.dropout): the network saved is the same for any valid value
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0


#: fields an earlier ``predictor.json`` may hold: name -> (whether the value, given the rest of the
#: file, describes the network built now, then dropped; why any other value is refused)
REMOVED_FIELDS: dict[str, tuple[Callable[[object, dict], bool], str]] = {
    "prev_token_routing": (_is_false, "names the decode variant (an input of the previous token's routing), "
                                      "which this version does not build; only false loads"),
    "conditioned": (_is_false, "names the conditioned variant (a correction from the previous layer's routing), "
                               "which this version does not build; only false loads"),
    "lookahead_previous_token": (_previous_token_heads, "names lookahead heads that do not read the previous "
                                                        "token's state, which this version does not build; only true "
                                                        "loads (or any value with lookahead_hidden 0)"),
    "dropout": (_training_dropout, "is not a training dropout (a number in [0, 1), not used by the saved network)"),
}


__all__ = ["CONFIG_NAME", "REMOVED_FIELDS", "WEIGHTS_NAME", "PredictorConfig"]
