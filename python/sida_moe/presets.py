"""Built-in models: real MoE architectures' shapes (``PRESETS``, built with random weights by
``sida_moe.preset_models``, tokenized by ``sida_moe.byte_tokenizer``), and the small trained
checkpoint shipped inside the package (``BUNDLED_MODELS``, the default of ``sida-moe generate``).
Names and shapes only: the command line lists them without importing torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field



@dataclass(frozen=True)
class Preset:
    """A named architecture shape."""

    name: str
    config_class: str
    model_class: str
    config: dict = field(repr=False)
    description: str = ""


BYTE_VOCAB = 259  # ByteTokenizer's ids: 3 specials + 256 bytes (tiny presets decode every token)

_QWEN3_30B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "qwen3-moe-tiny",
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            dict(_QWEN3_30B, vocab_size=BYTE_VOCAB, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=64,
                 num_experts_per_tok=8, max_position_embeddings=1024),
            "Qwen3-MoE scaled for a CPU: 4 layers, H=128, 64 experts top-8 (the default preset)",
        ),
        Preset("qwen3-30b-a3b", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", _QWEN3_30B,
               "Qwen3-30B-A3B shape: 48 layers, 128 experts top-8, H=2048, I=768 (58 GB of bf16 experts)"),
        Preset(
            "olmoe-1b-7b",
            "OlmoeConfig",
            "OlmoeForCausalLM",
            dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096),
            "OLMoE-1B-7B shape: 16 layers, 64 experts top-8, H=2048, I=1024",
        ),
        Preset(
            "switch-base-8-tiny",
            "SwitchTransformersConfig",
            "SwitchTransformersForConditionalGeneration",
            dict(vocab_size=BYTE_VOCAB, d_model=128, d_kv=32, d_ff=512, num_layers=4, num_decoder_layers=4, num_heads=4, num_experts=8,
                 encoder_sparse_step=2, decoder_sparse_step=2, expert_capacity=64, decoder_start_token_id=0, pad_token_id=0,
                 eos_token_id=1),
            "Switch-base-8 scaled for a CPU (the SiDA paper's model family): encoder-decoder, top-1, ReLU experts",
        ),
    ]
}

DEFAULT_PRESET = "qwen3-moe-tiny"

#: trained checkpoints shipped inside the package, each with its SiDA predictor: name -> directory.
#: ``qwen3-moe-stdlib``: Qwen3-MoE, 4 layers, hidden 128, 16 experts top-4, trained on the Python
#: standard library (``benches/train_default_model.py``; its ``NOTICE.md`` and ``training.json``)
BUNDLED_MODELS: dict[str, str] = {
    name: os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", name) for name in ("qwen3-moe-stdlib",)
}

#: the model of a no-argument ``sida-moe generate``
DEFAULT_MODEL = "qwen3-moe-stdlib"


def bundled_model_path(name: str = DEFAULT_MODEL) -> str:
    """The directory of a shipped checkpoint (``BUNDLED_MODELS``): pass it to ``sida_moe.from_pretrained``,
    ``transformers``' ``from_pretrained`` or ``sida_moe.predictor.load_prefetcher``."""
    try:
        path = BUNDLED_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown bundled model {name!r}; bundled models: {', '.join(BUNDLED_MODELS)}") from None
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"the bundled model {name!r} is missing from this installation (expected {path}); "
                                f"reinstall sida-moe")
    return path


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; built-in presets: {', '.join(PRESETS)}") from None


def preset_config(name: str):
    """The transformers config of a preset."""
    import transformers

    preset = get_preset(name)
    return getattr(transformers, preset.config_class)(**preset.config)


__all__ = ["BUNDLED_MODELS", "BYTE_VOCAB", "DEFAULT_MODEL", "DEFAULT_PRESET", "PRESETS", "Preset", "bundled_model_path",
           "get_preset", "preset_config"]
