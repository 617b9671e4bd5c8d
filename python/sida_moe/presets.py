"""Built-in models: real MoE architectures' shapes with random weights, built without downloads,
plus the byte-level tokenizer they use; and the small trained checkpoint shipped inside the package
(``BUNDLED_MODELS``, the default of ``sida-moe generate``).

``build_offloaded(name, ...)`` creates the dense part on the target device and writes every expert
straight into the pinned pool layer by layer (one layer of experts is materialised at a time), so
a preset larger than the GPU (``qwen3-30b-a3b``: 48 layers x 128 experts, 58 GB of bf16 experts)
builds on one GPU of 80 GB. ``build_model(name, ...)`` makes the ordinary all-resident model (the
reference the offloaded one is compared with).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from sida_moe.budget import BudgetSpec


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


def _init_dense_(model: nn.Module, std: float, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_meta:
                continue
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=generator)
            elif name.endswith("bias"):
                p.zero_()


def build_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                std: float = 0.02) -> nn.Module:
    """The all-resident model of a preset with random weights (normal, ``std``), in eval mode."""
    import transformers

    preset = get_preset(name)
    config = preset_config(name)
    device = torch.device(device)
    with torch.device(device):
        model = getattr(transformers, preset.model_class)._from_config(config, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    _init_dense_(model, std, generator)
    return model.eval()


def build_offloaded(name: str, gpu_budget: BudgetSpec = "25%", device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, policy: str = "lru", prefetch="next_layer_gate",
                    seed: int = 0, std: float = 0.02, backend: str = "auto", progress: bool = False) -> nn.Module:
    """The offloaded model of a preset, built in place: dense weights random on ``device``, experts
    random and written into the pinned pool one layer at a time (never all on the device)."""
    import transformers
    from tqdm.auto import tqdm

    from sida_moe.engine_builder import EngineBuilder, parameters_on_meta
    from sida_moe.serving_config import ServingConfig

    options = ServingConfig.resolve(gpu_budget, policy, prefetch, backend, progress=progress)
    preset = get_preset(name)
    config = preset_config(name)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with parameters_on_meta():
        model = getattr(transformers, preset.model_class)._from_config(config, dtype=dtype)
    builder = EngineBuilder(model, device, options)
    engine, fmt = builder.engine, builder.fmt
    try:
        generator = torch.Generator(device=device).manual_seed(seed)
        shapes = fmt.tensor_shapes()
        for layer in tqdm(builder.layers, desc="building experts", unit="layer", disable=not options.progress):
            # one layer of experts at a time, generated on the device, then copied to the host once
            host = {n: torch.empty((layer.num_experts, *s), dtype=dtype, device=device).normal_(0.0, std, generator=generator).cpu()
                    for n, s in shapes.items()}
            for expert in range(layer.num_experts):
                engine.write_expert(layer.ordinal, expert, {n: t[expert] for n, t in host.items()})
        builder.replace_experts()
        # dense part: materialise the remaining meta parameters on the device
        for pname, param in list(model.named_parameters()):
            if param.is_meta:
                mod_name, _, attr = pname.rpartition(".")
                module = model.get_submodule(mod_name) if mod_name else model
                module._parameters[attr] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=False)
        for bname, buf in list(model.named_buffers()):
            mod_name, _, attr = bname.rpartition(".")
            module = model.get_submodule(mod_name) if mod_name else model
            module._buffers[attr] = buf.to(device)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if pname.endswith("norm.weight") or "layernorm" in pname or pname.endswith("layer_norm.weight"):
                    param.fill_(1.0)
                elif param.dim() >= 2:
                    param.normal_(0.0, std, generator=generator)
                else:
                    param.zero_()
        model.tie_weights()
        return builder.start().eval()
    except BaseException:
        builder.abandon()
        raise


class ByteTokenizer:
    """UTF-8 bytes as tokens, shifted past 3 specials (pad=0, eos=1, bos=2); works with any vocab
    of at least 259 entries."""

    pad_token_id = 0
    eos_token_id = 1
    bos_token_id = 2
    offset = 3

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < 256 + self.offset)
        return data.decode("utf-8", errors="replace")

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded batch: ``input_ids`` and ``attention_mask`` ``[B, S]``."""
        encoded = [self.encode(t) or [self.bos_token_id] for t in texts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, width - len(e) :] = torch.tensor(e)
            mask[row, width - len(e) :] = 1
        return {"input_ids": ids, "attention_mask": mask}


__all__ = ["BUNDLED_MODELS", "DEFAULT_MODEL", "DEFAULT_PRESET", "PRESETS", "ByteTokenizer", "Preset", "build_model",
           "build_offloaded", "bundled_model_path", "get_preset", "preset_config"]
