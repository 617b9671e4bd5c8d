"""DeepSeek-V3 style: sigmoid router with score-correction bias and grouped top-k (kept resident and
run as is), routed-scaling of the weights, shared experts resident, first ``first_k_dense_replace``
layers dense (found structurally)."""

from sida_moe.adapters.fused import FusedExpertsAdapter


class DeepseekV3Adapter(FusedExpertsAdapter):
    name = "deepseek_v3"
    model_types = ("deepseek_v3",)
