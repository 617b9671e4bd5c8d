"""OLMoE: softmax top-k router (64 experts, top-8 in the released model), no shared expert."""

from sida_moe.adapters.fused import FusedExpertsAdapter


class OlmoeAdapter(FusedExpertsAdapter):
    name = "olmoe"
    model_types = ("olmoe",)
