"""What an architecture adapter provides, and the description of one MoE layer it finds.

An adapter knows one model family's MoE block: where the experts module and the router are, how
the experts' weights map to the canonical layout of ``sida_moe.format`` (from a live module and
from checkpoint tensors), how the experts module receives its routing, and how to apply the router
to a hidden state (for next-layer prefetch). Everything else (pools, caches, compute) is shared.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from sida_moe.format import Activation, ExpertFormat

# config.hidden_act / dense_act_fn values -> canonical activation names
_HF_ACTIVATIONS: dict[str, Activation] = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}


def canonical_activation(hf_name: str) -> Activation:
    """Map a transformers activation name to the canonical one; ValueError for unsupported ones."""
    try:
        return _HF_ACTIVATIONS[hf_name]
    except KeyError:
        raise ValueError(
            f"expert activation {hf_name!r} is not supported; supported: {sorted(_HF_ACTIVATIONS)}"
        ) from None


@dataclass(frozen=True)
class CheckpointPiece:
    """Where bytes of one canonical expert tensor come from in a checkpoint.

    ``name`` is the on-disk tensor; ``index`` selects one expert along dim 0 of a fused tensor (None
    for a per-expert tensor). ``transform`` is None when the bytes copy unchanged (then they land at
    ``dst_offset`` bytes into the pool tensor ``tensor``), else a function turning the selected tensor
    into the canonical one (GPT-OSS de-interleave/transposition); that path goes through Python.
    ``shape`` is the whole on-disk tensor's shape the model's config implies; a checkpoint tensor
    of another shape is refused before anything is loaded.
    """

    name: str
    tensor: str
    index: int | None = None
    dst_offset: int = 0
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    shape: tuple[int, ...] | None = None


# the first index in a module path is the decoder (or encoder) layer holding it: "model.layers.3.mlp"
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(eq=False)
class MoELayer:
    """One MoE layer of a model, as the engine, the prefetchers and the predictor see it."""

    ordinal: int  # MoE-layer ordinal: the `layer` key of the pool and the cache
    path: str  # dotted path of the experts module, e.g. "model.layers.3.mlp.experts"
    block: nn.Module  # the module owning router and experts
    experts_attr: str  # attribute of `block` holding the experts module
    router: nn.Module
    num_experts: int
    top_k: int
    stack: str  # "decoder" or "encoder": prefetch looks ahead only inside one stack
    adapter: Adapter = field(repr=False)
    #: index of the layer of its stack holding it (read from ``path``; the ordinal when the path
    #: names none): differs from ``ordinal`` where dense layers sit between MoE ones
    decoder_layer: int = field(init=False)

    def __post_init__(self) -> None:
        m = _LAYER_INDEX.search(f".{self.path}.")
        self.decoder_layer = int(m.group(1)) if m else self.ordinal

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply this layer's router to ``hidden`` [T, H]; returns the [T, top_k] expert ids."""
        return self.adapter.predict(self, hidden)

    def gate_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This layer's router logits [T, E] for ``hidden`` [T, H] (no hook sees the call)."""
        return self.adapter.gate_logits(self, hidden)

    @property
    def experts(self) -> nn.Module:
        """The block's current experts module (the engine's once the model is offloaded), so hooks
        registered after ``offload`` see the module that runs."""
        return getattr(self.block, self.experts_attr)


class Adapter:
    """Base class of the per-family adapters (see the module docstring)."""

    #: family name shown to users
    name: str = ""
    #: ``config.model_type`` values this adapter serves
    model_types: tuple[str, ...] = ()
    #: checkpoint-name rewrites (regex, replacement) from on-disk names to module names
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    #: the experts module's forward receives (hidden, ids, weights) or (hidden, one-hot, weights)
    routing_kind: Literal["topk", "onehot"] = "topk"

    def matches(self, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in self.model_types

    def find_layers(self, model: nn.Module) -> list[MoELayer]:
        raise NotImplementedError

    def expert_format(self, model: nn.Module, layer: MoELayer) -> ExpertFormat:
        raise NotImplementedError

    def expert_weights(self, layer: MoELayer, expert: int) -> dict[str, torch.Tensor]:
        """Canonical tensors of one expert taken from the live module (any device, contiguous)."""
        raise NotImplementedError

    def write_expert_weights(self, layer: MoELayer, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`expert_weights`: copy one expert's canonical tensors back into the live
        module's parameters (their storage allocated). ``offload`` uses it to put a model back
        when it fails part-way; without it, ``offload`` keeps the original weights until it is done."""
        raise NotImplementedError

    def checkpoint_pieces(self, layer: MoELayer, expert: int, fmt: ExpertFormat, names: set[str]) -> list[CheckpointPiece]:
        """Pieces filling every canonical tensor of one expert from the on-disk tensors ``names``."""
        raise NotImplementedError

    def expert_param_names(self, layer: MoELayer) -> list[str]:
        """Dotted names of the parameters of the experts module (never loaded as dense weights)."""
        return [f"{layer.path}.{n}" for n, _ in layer.experts.named_parameters()]

    def predict(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def gate_logits(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        # forward(), not __call__: a prediction must not show up among the router outputs that
        # transformers' output recorders collect; logits are the output or its first element
        out = layer.router.forward(hidden)
        return out[0] if isinstance(out, (tuple, list)) else out

    def read_routing(self, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn the experts module's routing arguments into ([T, k] ids, [T, k] weights)."""
        return first, second
