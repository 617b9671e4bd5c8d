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
