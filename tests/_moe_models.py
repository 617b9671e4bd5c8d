"""Tiny random models of every supported family, shared by the offload / adapter tests."""

from __future__ import annotations

import torch
import transformers

# family -> (config class, model class, config kwargs)
_COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)

FAMILIES: dict[str, tuple[str, str, dict]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_COMMON, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
             num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1]),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(_COMMON, intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, head_dim=8),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(_COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(_COMMON | {"num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
             topk_group=1, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5, norm_topk_prob=True),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(_COMMON, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2, head_dim=8, sliding_window=8,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    ),
    "switch_transformers": (
        "SwitchTransformersConfig",
        "SwitchTransformersForConditionalGeneration",
        dict(vocab_size=96, d_model=32, d_kv=8, d_ff=24, num_layers=3, num_decoder_layers=3, num_heads=4, num_experts=6,
             encoder_sparse_step=2, decoder_sparse_step=2, expert_capacity=64, decoder_start_token_id=0, pad_token_id=0,
             eos_token_id=1),
    ),
}


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model of ``family`` in eval mode (config ``overrides`` applied); weights scaled
    up so that routing and logits are not all ties."""
    config_cls, model_cls, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**(kwargs | overrides))
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
    return model.to(dtype).eval()


def eager_experts(model: torch.nn.Module) -> torch.nn.Module:
    """Use Hugging Face's eager experts loop (the op-by-op twin of the reference kernel), so CPU
    comparisons can be exact; Switch has no experts-implementation switch."""
    if hasattr(model, "set_experts_implementation") and getattr(model.config, "model_type", "") != "switch_transformers":
        model.set_experts_implementation("eager")
    return model


def prompt_batch(vocab: int = 90, batch: int = 2, length: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts, left-padded: row 1 has two padding positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :2] = 0
        ids[1, :2] = 0
    return ids, mask


def forward_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits of one full forward (encoder-decoder models decode the prompt itself)."""
    extra = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    return model(input_ids=ids, attention_mask=mask, **extra).logits


def greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int = 6) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


# documented logit tolerances, relative to the largest |logit|, offloaded vs eager original
LOGIT_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def save_with_letter_tokenizer(model: torch.nn.Module, directory):
    """Save ``model`` with a one-letter-per-token tokenizer (a-z, then ``<eos>``) beside it: a
    checkpoint the CLI can trace text through. Returns ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(ord("a") + i): i for i in range(26)} | {"<eos>": 26}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    model.save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<eos>").save_pretrained(directory)
    return directory
