"""Bad input to offload / from_pretrained gives a clear exception of the right class."""

import pytest
import torch

from _moe_models import tiny_model
import sida_moe


def test_budget_below_top_k_names_the_minimum():
    model = tiny_model("qwen3_moe")  # top-3 experts per token
    with pytest.raises(sida_moe.BudgetError, match=r"needs 3: the minimum budget is \d+ bytes"):
        sida_moe.offload(model, gpu_budget="1000B")
    # nothing was moved: the experts are still the original module
    assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"


def test_fraction_budget_too_small():
    with pytest.raises(sida_moe.BudgetError, match="minimum budget"):
        sida_moe.offload(tiny_model("mixtral"), gpu_budget=0.01)


@pytest.mark.parametrize("budget", [0, -5, 1.5, "lots", "12 parsecs", True, [1]])
def test_invalid_budget_values(budget):
    with pytest.raises((ValueError, TypeError)):
        sida_moe.offload(tiny_model("olmoe"), gpu_budget=budget)


def test_meta_device_model():
    from transformers import Qwen3MoeForCausalLM

    config = tiny_model("qwen3_moe").config
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    with pytest.raises(ValueError, match="meta device.*from_pretrained"):
        sida_moe.offload(model)


def test_quantized_model_is_refused():
    model = tiny_model("mixtral")
    model.config.quantization_config = {"quant_method": "bitsandbytes"}
    with pytest.raises(NotImplementedError, match="quantized.*bitsandbytes"):
        sida_moe.offload(model)


def test_mismatched_dtype():
    model = tiny_model("olmoe")
    for layer in model.model.layers:
        layer.mlp.experts.to(torch.bfloat16)
    with pytest.raises(ValueError, match="mismatched dtype: the experts are torch.bfloat16 but the model computes in torch.float32"):
        sida_moe.offload(model)


def test_unsupported_architecture_names_supported_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="unsupported architecture 'llama'.*mixtral.*qwen3_moe.*switch_transformers"):
        sida_moe.offload(model)


def test_not_a_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        sida_moe.offload(torch.nn.Linear(2, 2))


def test_offloading_twice():
    model = sida_moe.offload(tiny_model("qwen3_moe"), gpu_budget=1.0)
    with pytest.raises(ValueError, match="already offloaded"):
        sida_moe.offload(model)


@pytest.mark.parametrize("kwargs, match", [
    (dict(policy="random"), "policy must be one of"),
    (dict(prefetch="psychic"), "unknown prefetch"),
    (dict(backend="cuda"), "backend='cuda' needs the model on a CUDA device"),
    (dict(backend="tpu"), "backend must be"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sida_moe.offload(tiny_model("olmoe"), **kwargs)


def test_prefetch_object_must_follow_protocol():
    with pytest.raises(TypeError, match="Prefetcher protocol"):
        sida_moe.offload(tiny_model("olmoe"), prefetch=object())


def test_engine_of_plain_model():
    with pytest.raises(ValueError, match="not offloaded"):
        sida_moe.engine_of(tiny_model("olmoe"))


def test_closed_engine_cannot_run():
    model = sida_moe.offload(tiny_model("olmoe"), gpu_budget=1.0)
    model.sida_engine.close()
    model.sida_engine.close()  # idempotent
    with pytest.raises((sida_moe.ClosedError, RuntimeError)):
        model(torch.tensor([[5, 6, 7]]))


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        sida_moe.from_pretrained(tmp_path / "missing")
    model = tiny_model("qwen3_moe")
    model.config.quantization_config = {"quant_method": "fp8"}
    model.config.save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="quantized"):
        sida_moe.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "config.json").unlink()
    tiny_model("qwen3_moe").config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        sida_moe.from_pretrained(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        sida_moe.from_pretrained(tmp_path, dtype="float8", device="cpu")
