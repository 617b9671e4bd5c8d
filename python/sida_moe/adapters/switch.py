"""Switch Transformers (the SiDA paper's model): top-1 router in float32 with expert capacity (kept
resident and run as is, so capacity dropping matches Hugging Face), one ``DenseActDense`` module per
expert (``experts.expert_i.wi / wo``, ReLU), sparse layers every ``*_sparse_step`` in both the
encoder and the decoder. The experts module receives a one-hot dispatch mask ``[T, 1, E]`` (all
zero for a dropped token) and the router probability ``[T, 1]``."""

from __future__ import annotations

import re

import torch
from torch import nn

from sida_moe.adapters.base import Adapter, CheckpointPiece, MoELayer, canonical_activation
from sida_moe.format import ExpertFormat


def _switch_experts_of(module: nn.Module) -> nn.Module | None:
    experts = getattr(module, "experts", None)
    router = getattr(module, "router", None)
    if isinstance(experts, nn.ModuleDict) and "expert_0" in experts and isinstance(getattr(router, "classifier", None), nn.Linear):
        return experts
    return None


class SwitchAdapter(Adapter):
    name = "switch_transformers"
    model_types = ("switch_transformers",)
    routing_kind = "onehot"

    def find_layers(self, model: nn.Module) -> list[MoELayer]:
        layers: list[MoELayer] = []
        for path, module in model.named_modules():
            experts = _switch_experts_of(module)
            if experts is None:
                continue
            stack = "encoder" if re.search(r"(^|\.)encoder\.", path + ".") else "decoder"
            layers.append(
                MoELayer(
                    ordinal=len(layers),
                    path=f"{path}.experts",
                    block=module,
                    experts_attr="experts",
                    router=module.router,
                    num_experts=len(experts),
                    top_k=1,
                    stack=stack,
                    adapter=self,
                )
            )
        return layers

    def expert_format(self, model: nn.Module, layer: MoELayer) -> ExpertFormat:
        wi = layer.experts["expert_0"].wi.weight  # [d_ff, d_model]
        act = canonical_activation(getattr(model.config, "dense_act_fn", "relu"))
        return ExpertFormat(hidden=int(wi.shape[1]), intermediate=int(wi.shape[0]), dtype=wi.dtype, gated=False, activation=act)

    def expert_weights(self, layer: MoELayer, expert: int) -> dict[str, torch.Tensor]:
        mlp = layer.experts[f"expert_{expert}"]
        return {"gate_up": mlp.wi.weight.detach().contiguous(), "down": mlp.wo.weight.detach().contiguous()}

    def write_expert_weights(self, layer: MoELayer, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        mlp = layer.experts[f"expert_{expert}"]
        with torch.no_grad():
            mlp.wi.weight.copy_(tensors["gate_up"])
            mlp.wo.weight.copy_(tensors["down"])

    def checkpoint_pieces(self, layer: MoELayer, expert: int, fmt: ExpertFormat, names: set[str]) -> list[CheckpointPiece]:
        wi, wo = f"{layer.path}.expert_{expert}.wi.weight", f"{layer.path}.expert_{expert}.wo.weight"
        missing = [n for n in (wi, wo) if n not in names]
        if missing:
            raise KeyError(f"checkpoint lacks expert tensors {missing}")
        i, h = fmt.intermediate, fmt.hidden
        return [CheckpointPiece(wi, "gate_up", shape=(i, h)), CheckpointPiece(wo, "down", shape=(h, i))]

    def predict(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        return self.gate_logits(layer, hidden).argmax(dim=-1, keepdim=True)

    def gate_logits(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        classifier = layer.router.classifier
        return classifier(hidden.to(classifier.weight.dtype))

    def read_routing(self, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one-hot [T, K, E] (zero rows = dropped by capacity) -> ids [T, K]; dropped pairs get weight 0
        ids = first.argmax(dim=-1)
        kept = first.sum(dim=-1) > 0
        weights = second.reshape(ids.shape)
        return ids, torch.where(kept, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))
