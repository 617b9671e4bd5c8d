"""Bad input to offload / from_pretrained gives a clear exception of the right class."""

import pytest
import torch

from _moe_models import FAMILIES, eager_experts, greedy, prompt_batch, tiny_model
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
    (dict(policy="random"), "unknown policy"),
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


# ------------------------------------------------------------------ all or nothing
def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _assert_original(model, weights, tokens, hooks):
    """The model is the original one, working: same modules, weights, hooks and tokens."""
    from sida_moe.experts import OffloadedExperts

    assert not any(isinstance(m, OffloadedExperts) for m in model.modules())
    assert not hasattr(model, "sida_engine")
    assert "generate" not in model.__dict__  # transformers' own generate again
    assert _hook_count(model) == hooks
    after = model.state_dict()
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[n], w) for n, w in weights.items())
    ids, mask = prompt_batch()
    with torch.inference_mode():
        assert torch.equal(greedy(model, ids, mask), tokens)


def _original_state(model):
    ids, mask = prompt_batch()
    with torch.inference_mode():
        tokens = greedy(model, ids, mask)
    return _snapshot(model), tokens, _hook_count(model)


@pytest.mark.parametrize("kwargs", [
    dict(policy="xyz"),
    dict(prefetch="psychic"),
    dict(prefetch=object()),
    dict(copy_workers=-1),
    dict(copy_workers=65),
    dict(copy_workers=True),
    dict(copy_workers="2"),
    dict(backend="tpu"),
])
def test_bad_options_leave_the_model_untouched(kwargs):
    model = eager_experts(tiny_model("qwen3_moe"))
    state = _original_state(model)
    with pytest.raises((ValueError, TypeError)):
        sida_moe.offload(model, gpu_budget="50%", **kwargs)
    _assert_original(model, *state)
    offloaded = sida_moe.offload(model, gpu_budget="50%")  # not "already offloaded"
    ids, mask = prompt_batch()
    with torch.inference_mode():
        assert torch.equal(greedy(offloaded, ids, mask), state[1])
    offloaded.sida_engine.close()


class _Boom(Exception):
    pass


def _fail_in(monkeypatch, step, exc):
    """Make one step of ``offload`` raise ``exc`` part-way."""
    import importlib

    from sida_moe.engine import OffloadEngine

    off = importlib.import_module("sida_moe.offloading")
    builder_module = importlib.import_module("sida_moe.engine_builder")

    if step == "write_expert":  # while the experts are copied into the pool, one layer done
        real = OffloadEngine.write_expert
        calls = []

        def write_expert(self, *args):
            calls.append(1)
            if len(calls) == 12:  # in the second MoE layer
                raise exc
            return real(self, *args)

        monkeypatch.setattr(OffloadEngine, "write_expert", write_expert)
    elif step == "release":  # while the original weights are being freed
        real = off._release_storage
        calls = []

        def release(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                real(*args, **kwargs)
                raise exc
            return real(*args, **kwargs)

        monkeypatch.setattr(off, "_release_storage", release)
    elif step == "open_cache":  # after every original weight was freed
        def open_cache(self, *args):
            raise exc

        monkeypatch.setattr(OffloadEngine, "open_cache", open_cache)
    elif step == "attach":  # the cache is open, the prefetcher attaches
        from sida_moe.prefetchers import NextLayerGate

        def attach(self, engine):
            raise exc

        monkeypatch.setattr(NextLayerGate, "attach", attach)
    elif step == "hooks":  # hooks installed, generate not routed yet
        real = builder_module._install_hooks

        def install(model, engine):
            real(model, engine)
            raise exc

        monkeypatch.setattr(builder_module, "_install_hooks", install)
    elif step == "generate":  # the last step: generate routed through the engine
        real = builder_module.install_generate

        def install(model):
            real(model)
            raise exc

        monkeypatch.setattr(builder_module, "install_generate", install)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), _Boom("injected")], ids=["ctrl-c", "error"])
@pytest.mark.parametrize("step", ["write_expert", "release", "open_cache", "attach", "hooks", "generate"])
def test_a_failure_part_way_leaves_the_original_model_working(monkeypatch, step, exc):
    model = eager_experts(tiny_model("qwen3_moe"))
    state = _original_state(model)
    with monkeypatch.context() as m:
        _fail_in(m, step, exc)
        with pytest.raises(type(exc)):
            sida_moe.offload(model, gpu_budget="50%")
    _assert_original(model, *state)
    offloaded = sida_moe.offload(model, gpu_budget="50%")
    ids, mask = prompt_batch()
    with torch.inference_mode():
        assert torch.equal(greedy(offloaded, ids, mask), state[1])
    offloaded.sida_engine.close()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gets_its_weights_back_from_the_pool(monkeypatch, family):
    """A failure after the originals were freed writes them back from the pool (each adapter's
    inverse of its canonical layout), bit for bit."""
    model = eager_experts(tiny_model(family))
    state = _original_state(model)
    with monkeypatch.context() as m:
        _fail_in(m, "open_cache", _Boom("injected"))
        with pytest.raises(_Boom):
            sida_moe.offload(model, gpu_budget=1.0)
    _assert_original(model, *state)


def test_engine_reopen_with_a_bad_size_keeps_the_open_cache():
    model = sida_moe.offload(tiny_model("olmoe"), gpu_budget=1.0)
    engine = model.sida_engine
    total = engine.num_experts_total
    for bad in (0, total + 1, 10**12, 2.5):
        with pytest.raises(sida_moe.BudgetError, match=f"1..={total}"):
            engine.reopen_cache(bad)
    with pytest.raises(ValueError, match="copy_workers"):
        engine.reopen_cache(4, copy_workers=100)
    assert engine.num_slots == total and not engine.cache.closed
    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7]]))
    engine.close()


def test_close_cache_stops_the_feed_and_the_cache_and_keeps_the_pool():
    model = sida_moe.offload(tiny_model("olmoe"), gpu_budget=1.0)
    engine = model.sida_engine
    feed, cache = engine.feed, engine.cache
    engine.close_cache()
    assert feed.closed and cache.closed and engine.cache is None and engine.feed is None
    with pytest.raises(RuntimeError, match="cache is not open"):
        engine.stats()
    engine.reopen_cache(engine.slots_for("50%"))  # the pool kept every expert
    ids, mask = prompt_batch()
    with torch.inference_mode():
        greedy(model, ids, mask)
    assert engine.stats()["misses"] > 0
    engine.close()


def test_write_expert_refuses_tensors_of_another_format_naming_the_expert():
    model = sida_moe.offload(tiny_model("olmoe"), gpu_budget=1.0)
    engine = model.sida_engine
    good = {n: torch.zeros(s, dtype=engine.fmt.dtype) for n, s in engine.fmt.tensor_shapes().items()}
    with pytest.raises(ValueError, match=r"expert \(0, 1\): tensors must be exactly"):
        engine.write_expert(0, 1, {**good, "extra": torch.zeros(1)})
    bad = dict(good, down=good["down"].double())
    with pytest.raises(ValueError, match=r"expert \(0, 1\) tensor 'down': expected"):
        engine.write_expert(0, 1, bad)
    engine.close()
