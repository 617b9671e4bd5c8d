"""Mixtral: softmax top-k router with renormalised weights; checkpoints name experts w1/w3/w2 under
``block_sparse_moe`` (transformers >= 5 calls the block ``mlp``)."""

from sida_moe.adapters.fused import FusedExpertsAdapter


class MixtralAdapter(FusedExpertsAdapter):
    name = "mixtral"
    model_types = ("mixtral",)
    checkpoint_renames = ((r"\.block_sparse_moe\.", ".mlp."),)
    per_expert_names = ("w1.weight", "w3.weight", "w2.weight")
