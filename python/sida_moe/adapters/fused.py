"""Shared adapter for transformers (>= 5) MoE blocks with fused 3-D expert parameters.

The block owns a router (``gate`` or ``router``) returning ``(logits, weights, ids)`` and an
experts module with ``gate_up_proj [E, 2I, H]`` (gate rows then up rows) and ``down_proj [E, H, I]``;
the experts module's forward is ``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``.
Blocks are found structurally, so renamed parents and extra submodules (shared experts) do not
matter. Families differ only in names, activation and the per-expert checkpoint names.
"""

from __future__ import annotations

import torch
from torch import nn

from sida_moe.adapters.base import Adapter, CheckpointPiece, MoELayer, canonical_activation
from sida_moe.format import ExpertFormat

_ROUTER_ATTRS = ("gate", "router")


def _fused_experts_of(module: nn.Module) -> nn.Module | None:
    experts = getattr(module, "experts", None)
    if not isinstance(experts, nn.Module):
        return None
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    if isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3 and down.dim() == 3:
        return experts
    return None


class FusedExpertsAdapter(Adapter):
    """Base of the fused-experts families; subclasses set names and checkpoint naming."""

    #: per-expert checkpoint names (relative to "<experts path>.<e>.") of gate, up and down
    per_expert_names: tuple[str, str, str] = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")

    def find_layers(self, model: nn.Module) -> list[MoELayer]:
        layers: list[MoELayer] = []
        for path, module in model.named_modules():
            experts = _fused_experts_of(module)
            if experts is None:
                continue
            router = next((getattr(module, a) for a in _ROUTER_ATTRS if isinstance(getattr(module, a, None), nn.Module)), None)
            if router is None:
                raise ValueError(f"{type(module).__name__} at {path!r} has fused experts but no 'gate'/'router' module")
            top_k = getattr(router, "top_k", None) or getattr(model.config, "num_experts_per_tok", None)
            if not top_k:
                raise ValueError(f"cannot tell top_k of the router at {path!r}")
            layers.append(
                MoELayer(
                    ordinal=len(layers),
                    path=f"{path}.experts" if path else "experts",
                    block=module,
                    experts_attr="experts",
                    router=router,
                    num_experts=int(experts.gate_up_proj.shape[0]),
                    top_k=int(top_k),
                    stack="decoder",
                    adapter=self,
                )
            )
        return layers

    def expert_format(self, model: nn.Module, layer: MoELayer) -> ExpertFormat:
        experts = layer.experts
        _, two_i, hidden = experts.gate_up_proj.shape
        act = canonical_activation(getattr(model.config, "hidden_act", "silu"))
        return ExpertFormat(hidden=int(hidden), intermediate=int(two_i) // 2, dtype=experts.gate_up_proj.dtype, activation=act)

    def expert_weights(self, layer: MoELayer, expert: int) -> dict[str, torch.Tensor]:
        experts = layer.experts
        return {
            "gate_up": experts.gate_up_proj[expert].detach().contiguous(),
            "down": experts.down_proj[expert].detach().contiguous(),
        }

    def write_expert_weights(self, layer: MoELayer, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        experts = layer.experts
        with torch.no_grad():
            experts.gate_up_proj[expert].copy_(tensors["gate_up"])
            experts.down_proj[expert].copy_(tensors["down"])

    def checkpoint_pieces(self, layer: MoELayer, expert: int, fmt: ExpertFormat, names: set[str]) -> list[CheckpointPiece]:
        fused_gu, fused_down = f"{layer.path}.gate_up_proj", f"{layer.path}.down_proj"
        e, i, h = layer.num_experts, fmt.intermediate, fmt.hidden
        if fused_gu in names and fused_down in names:
            return [CheckpointPiece(fused_gu, "gate_up", index=expert, shape=(e, 2 * i, h)),
                    CheckpointPiece(fused_down, "down", index=expert, shape=(e, h, i))]
        gate, up, down = (f"{layer.path}.{expert}.{n}" for n in self.per_expert_names)
        missing = [n for n in (gate, up, down) if n not in names]
        if missing:
            raise KeyError(f"checkpoint lacks expert tensors {missing} (nor fused {fused_gu!r})")
        half = fmt.intermediate * fmt.hidden * fmt.itemsize
        return [
            CheckpointPiece(gate, "gate_up", shape=(i, h)),
            CheckpointPiece(up, "gate_up", dst_offset=half, shape=(i, h)),
            CheckpointPiece(down, "down", shape=(h, i)),
        ]

    def predict(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        # forward(), not __call__: the output recorders of transformers hook the router modules, and a
        # prediction must not show up as a router output (router_logits, aux_loss)
        return layer.router.forward(hidden)[2]
