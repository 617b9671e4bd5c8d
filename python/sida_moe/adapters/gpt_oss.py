"""GPT-OSS: router with bias, softmax over the top-k logits; experts with biases, clamped SwiGLU
``(up + 1) * gate * sigmoid(alpha * gate)``, and ``gate_up_proj [E, H, 2I]`` transposed with gate and up
interleaved along the last dim (``down_proj [E, I, H]``). Converted to the canonical layout by
de-interleaving and transposing, so checkpoints go through the Python loading path."""

from __future__ import annotations

import torch
from torch import nn

from sida_moe.adapters.base import CheckpointPiece, MoELayer
from sida_moe.adapters.fused import FusedExpertsAdapter
from sida_moe.format import ExpertFormat


def canonical_gate_up(w: torch.Tensor) -> torch.Tensor:
    """``[H, 2I]`` interleaved (gate at even columns) -> ``[2I, H]`` gate rows then up rows."""
    t = w.transpose(-1, -2)
    return torch.cat([t[0::2], t[1::2]], dim=0).contiguous()


def canonical_gate_up_bias(b: torch.Tensor) -> torch.Tensor:
    """``[2I]`` interleaved -> ``[2I]`` gate then up."""
    return torch.cat([b[0::2], b[1::2]]).contiguous()


def canonical_down(w: torch.Tensor) -> torch.Tensor:
    """``[I, H]`` -> ``[H, I]``."""
    return w.transpose(-1, -2).contiguous()


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous()


class GptOssAdapter(FusedExpertsAdapter):
    name = "gpt_oss"
    model_types = ("gpt_oss",)

    def expert_format(self, model: nn.Module, layer: MoELayer) -> ExpertFormat:
        experts = layer.experts
        _, hidden, two_i = experts.gate_up_proj.shape
        return ExpertFormat(
            hidden=int(hidden),
            intermediate=int(two_i) // 2,
            dtype=experts.gate_up_proj.dtype,
            activation="gpt_oss",
            has_bias=True,
            alpha=float(getattr(experts, "alpha", 1.702)),
            limit=float(getattr(experts, "limit", 7.0)),
        )

    def expert_weights(self, layer: MoELayer, expert: int) -> dict[str, torch.Tensor]:
        e = layer.experts
        return {
            "gate_up": canonical_gate_up(e.gate_up_proj[expert].detach()),
            "down": canonical_down(e.down_proj[expert].detach()),
            "gate_up_bias": canonical_gate_up_bias(e.gate_up_proj_bias[expert].detach()),
            "down_bias": e.down_proj_bias[expert].detach().contiguous(),
        }

    def write_expert_weights(self, layer: MoELayer, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        e = layer.experts
        half = tensors["gate_up"].shape[0] // 2
        with torch.no_grad():
            gate_up = e.gate_up_proj[expert].transpose(-1, -2)  # [2I, H] view, gate and up interleaved
            gate_up[0::2].copy_(tensors["gate_up"][:half])
            gate_up[1::2].copy_(tensors["gate_up"][half:])
            e.down_proj[expert].copy_(tensors["down"].transpose(-1, -2))
            bias = e.gate_up_proj_bias[expert]
            bias[0::2].copy_(tensors["gate_up_bias"][:half])
            bias[1::2].copy_(tensors["gate_up_bias"][half:])
            e.down_proj_bias[expert].copy_(tensors["down_bias"])

    def checkpoint_pieces(self, layer: MoELayer, expert: int, fmt: ExpertFormat, names: set[str]) -> list[CheckpointPiece]:
        p = layer.path
        wanted = [f"{p}.gate_up_proj", f"{p}.down_proj", f"{p}.gate_up_proj_bias", f"{p}.down_proj_bias"]
        missing = [n for n in wanted if n not in names]
        if missing:
            blocks = [n for n in names if n.startswith(p) and (n.endswith("_blocks") or n.endswith("_scales"))]
            if blocks:
                raise NotImplementedError(
                    f"{p} is stored quantized (MXFP4 {blocks[:2]}); quantized expert weights are not supported yet: "
                    "use a bf16/fp16/fp32 checkpoint"
                )
            raise KeyError(f"checkpoint lacks expert tensors {missing}")
        e, i, h = layer.num_experts, fmt.intermediate, fmt.hidden
        return [
            CheckpointPiece(wanted[0], "gate_up", index=expert, transform=canonical_gate_up, shape=(e, h, 2 * i)),
            CheckpointPiece(wanted[1], "down", index=expert, transform=canonical_down, shape=(e, i, h)),
            CheckpointPiece(wanted[2], "gate_up_bias", index=expert, transform=canonical_gate_up_bias, shape=(e, 2 * i)),
            CheckpointPiece(wanted[3], "down_bias", index=expert, transform=_identity, shape=(e, h)),
        ]
