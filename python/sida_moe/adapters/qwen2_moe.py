"""Qwen2-MoE: softmax top-k router; a shared expert with a sigmoid gate stays resident (it is part of
the block, not of the experts module); MoE only on layers picked by ``decoder_sparse_step`` /
``mlp_only_layers`` (found structurally)."""

from sida_moe.adapters.fused import FusedExpertsAdapter


class Qwen2MoeAdapter(FusedExpertsAdapter):
    name = "qwen2_moe"
    model_types = ("qwen2_moe",)
