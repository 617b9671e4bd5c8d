"""Qwen3-MoE: softmax top-k router (optionally renormalised), no shared expert."""

from sida_moe.adapters.fused import FusedExpertsAdapter


class Qwen3MoeAdapter(FusedExpertsAdapter):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)
