"""from_pretrained: experts stream from safetensors into the pool (natively, or through the Python
path for GPT-OSS and dtype conversion); the result equals the model transformers loads."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from _moe_models import FAMILIES, eager_experts, greedy, prompt_batch, tiny_model
import sida_moe


def _saved(tmp_path, family, dtype=torch.float32):
    model = tiny_model(family, dtype)
    model.save_pretrained(tmp_path)
    return type(model).from_pretrained(tmp_path, dtype=dtype).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_tokens_as_transformers_loading(tmp_path, family):
    reference = eager_experts(_saved(tmp_path, family))
    model = sida_moe.from_pretrained(tmp_path, gpu_budget=0.5, device="cpu", progress=False)
    assert not any(p.is_meta for p in model.parameters())
    ids, mask = prompt_batch()
    with torch.inference_mode():
        assert torch.equal(greedy(reference, ids, mask), greedy(model, ids, mask))
    model.sida_engine.close()


def test_pool_bytes_equal_canonical_weights(tmp_path):
    """Per-expert gate/up tensors land at the right offsets of the canonical gate_up."""
    reference = _saved(tmp_path, "qwen3_moe")
    model = sida_moe.from_pretrained(tmp_path, gpu_budget=1.0, device="cpu", progress=False)
    pool = model.sida_engine.pool
    experts = reference.model.layers[2].mlp.experts
    for e in (0, 5):
        assert pool.read(2, e, "gate_up") == experts.gate_up_proj[e].detach().contiguous().numpy().tobytes()
        assert pool.read(2, e, "down") == experts.down_proj[e].detach().contiguous().numpy().tobytes()


def test_dtype_conversion_and_sharded_index(tmp_path):
    """An fp32 checkpoint split over two shards with an index, loaded as bf16 (Python path)."""
    model = tiny_model("olmoe")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, tmp_path / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = sida_moe.from_pretrained(tmp_path, gpu_budget=1.0, dtype="bfloat16", device="cpu", progress=False)
    assert loaded.sida_engine.fmt.dtype == torch.bfloat16
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    reference = eager_experts(type(model).from_pretrained(tmp_path, dtype=torch.bfloat16).eval())
    ids, mask = prompt_batch()
    with torch.inference_mode():
        assert torch.equal(greedy(reference, ids, mask), greedy(loaded, ids, mask))


def test_fused_on_disk_experts(tmp_path):
    """Checkpoints that store the fused 3-D expert tensors load through byte ranges of them."""
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}  # module names: fused experts
    (tmp_path / "model.safetensors").unlink()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = sida_moe.from_pretrained(tmp_path, gpu_budget=1.0, device="cpu", progress=False)
    pool = loaded.sida_engine.pool
    assert pool.read(1, 3, "gate_up") == model.model.layers[1].mlp.experts.gate_up_proj[3].detach().contiguous().numpy().tobytes()
    ids, mask = prompt_batch()
    with torch.inference_mode():
        assert torch.equal(greedy(eager_experts(model), ids, mask), greedy(loaded, ids, mask))


def test_missing_expert_tensor(tmp_path):
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.4.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"model.layers.1.mlp.experts.4.up_proj.weight"):
        sida_moe.from_pretrained(tmp_path, device="cpu", progress=False)


def test_missing_dense_tensor(tmp_path):
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 dense tensors.*q_proj"):
        sida_moe.from_pretrained(tmp_path, device="cpu", progress=False)


# ----------------------------------------------------------------------- bad checkpoints
def _rewrite(tmp_path, edit):
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("family, name, fused", [
    ("qwen3_moe", "model.layers.1.mlp.experts.4.up_proj.weight", False),  # native path, per-expert tensor
    ("mixtral", "model.layers.2.mlp.experts.gate_up_proj", True),  # native path, fused tensor
    ("gpt_oss", "model.layers.0.mlp.experts.down_proj", True),  # Python path (transform)
    ("switch_transformers", "encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight", False),
])
def test_expert_tensor_of_a_consistent_but_wrong_shape_is_refused(tmp_path, family, name, fused):
    model = tiny_model(family)
    if fused:  # the checkpoint holds the module's own fused tensors
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
        model.config.save_pretrained(tmp_path)
    else:
        model.save_pretrained(tmp_path)
    found = {}

    def transpose_last_two(tensors):
        t = tensors[name]
        found["expected"], found["shape"] = list(t.shape), list(t.shape[:-2]) + [t.shape[-1], t.shape[-2]]
        tensors[name] = t.reshape(found["shape"])  # same bytes, same element count

    _rewrite(tmp_path, transpose_last_two)
    with pytest.raises(ValueError) as info:
        sida_moe.from_pretrained(tmp_path, device="cpu", progress=False)
    msg = str(info.value)
    assert name in msg and str(tmp_path / "model.safetensors") in msg
    assert str(found["expected"]) in msg and str(found["shape"]) in msg


def test_dense_tensor_of_a_wrong_shape_is_refused_before_loading(tmp_path):
    tiny_model("qwen3_moe").save_pretrained(tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(tmp_path, lambda t: t.__setitem__(name, t[name].t()))
    with pytest.raises(ValueError) as info:
        sida_moe.from_pretrained(tmp_path, device="cpu", progress=False)
    assert f"checkpoint tensor {name!r} in {tmp_path / 'model.safetensors'} has shape [32, 16], but the config makes" in str(info.value)
    assert str(info.value).endswith("[16, 32]")
    name = "model.embed_tokens.weight"
    _rewrite(tmp_path, lambda t: t.__setitem__(name, t[name][:90]))
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight.* has shape \[90, 32\], but the config makes .* \[96, 32\]"):
        sida_moe.from_pretrained(tmp_path, device="cpu", progress=False)


def test_invalid_index_names_the_file(tmp_path):
    tiny_model("olmoe").save_pretrained(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    for text, match in [
        ("{not json", "invalid JSON"),
        ('{"metadata": {}}', "weight_map"),
        ('["model.safetensors"]', "weight_map"),
        ('{"weight_map": {"a": 3}}', "weight_map"),
    ]:
        index.write_text(text)
        with pytest.raises(sida_moe.LoadError, match=match) as info:
            sida_moe.from_pretrained(tmp_path, device="cpu", progress=False)
        assert str(index) in str(info.value)
    index.write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": "model-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"model-00002.safetensors"):
        sida_moe.from_pretrained(tmp_path, device="cpu", progress=False)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_shard_names_the_file(tmp_path, damage):
    tiny_model("olmoe").save_pretrained(tmp_path)
    shard = tmp_path / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes({"truncated": data[:-100], "garbage": b"\x10" + bytes(7) + b"{not a header at all", "empty": b""}[damage])
    with pytest.raises(sida_moe.LoadError, match="not a valid safetensors file") as info:
        sida_moe.from_pretrained(tmp_path, device="cpu", progress=False)
    assert str(shard) in str(info.value)


@pytest.mark.parametrize("kwargs", [
    dict(policy="xyz"),
    dict(prefetch="psychic"),
    dict(copy_workers=65),
    dict(backend="tpu"),
    dict(device="tpu"),
    dict(device="cuda:banana"),
])
def test_from_pretrained_checks_its_arguments_before_reading_weights(tmp_path, monkeypatch, kwargs):
    import importlib

    tiny_model("olmoe").save_pretrained(tmp_path)
    off = importlib.import_module("sida_moe.offloading")

    def no_reading(*args, **kw):
        raise AssertionError("a weights file was opened before the arguments were checked")

    monkeypatch.setattr("safetensors.safe_open", no_reading)
    monkeypatch.setattr(off, "_open_shard", no_reading, raising=False)
    with pytest.raises(ValueError):
        sida_moe.from_pretrained(tmp_path, progress=False, **kwargs)
