"""Adapters: each family's layers are found, converted to the canonical layout, and computed by the
reference kernel exactly as Hugging Face's eager experts module computes them."""

import pytest
import torch

from _moe_models import FAMILIES, eager_experts, tiny_model
from sida_moe.adapters import adapter_for, supported_model_types
from sida_moe.adapters.gpt_oss import canonical_down, canonical_gate_up, canonical_gate_up_bias
from sida_moe.format import slot_views
from sida_moe.kernels.reference import fused_experts_reference

EXPECTED_LAYERS = {  # tiny configs: 3 decoder layers; qwen2 skips layer 1, deepseek layer 0, switch every 2nd
    "mixtral": 3, "qwen2_moe": 2, "qwen3_moe": 3, "olmoe": 3, "deepseek_v3": 2, "gpt_oss": 3, "switch_transformers": 2,
}


def pack_slots(fmt, experts):
    """Slot memory holding ``experts`` (canonical tensors), 256-byte aligned like the pool."""
    offsets, size = {}, 0
    for name, nbytes in fmt.layout():
        offsets[name] = size
        size += -(-nbytes // 256) * 256
    buf = torch.zeros(len(experts), size, dtype=torch.uint8)
    for slot, tensors in enumerate(experts):
        for name, nbytes in fmt.layout():
            buf[slot, offsets[name] : offsets[name] + nbytes] = tensors[name].reshape(-1).view(torch.uint8)
    return slot_views(buf, fmt, offsets)


def test_registry_lists_every_family():
    assert set(supported_model_types()) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_canonical_weights_reproduce_the_experts_module(family, dtype):
    model = eager_experts(tiny_model(family, dtype))
    adapter = adapter_for(model)
    layers = adapter.find_layers(model)
    assert len(layers) == EXPECTED_LAYERS[family]
    assert [layer.ordinal for layer in layers] == list(range(len(layers)))
    for layer in layers:
        fmt = adapter.expert_format(model, layer)
        assert fmt.dtype == dtype
        order = torch.randperm(layer.num_experts, generator=torch.Generator().manual_seed(layer.ordinal))
        views = pack_slots(fmt, [adapter.expert_weights(layer, int(e)) for e in order])
        slot_of_expert = torch.empty(layer.num_experts, dtype=torch.int32)
        slot_of_expert[order] = torch.arange(layer.num_experts, dtype=torch.int32)
        hidden = torch.randn(9, fmt.hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
        with torch.no_grad():
            if adapter.routing_kind == "topk":
                _, weights, ids = layer.router(hidden)
                want = layer.experts(hidden, ids, weights)
            else:  # Switch: one-hot dispatch [T, 1, E] and router probability [T, 1]
                dispatch, probs, _ = layer.router(hidden.unsqueeze(0))
                dispatch, probs = dispatch.view(9, 1, -1), probs.view(9, 1)
                want = layer.experts(hidden, dispatch, probs)
                ids, weights = adapter.read_routing(dispatch, probs)
            got = fused_experts_reference(hidden, ids, weights, slot_of_expert, views, fmt)
        if family == "gpt_oss":  # HF multiplies by the transposed [H, 2I] layout: summation order differs
            tol = (1e-6 if dtype == torch.float32 else 1e-2) * want.float().abs().max()
            assert (got.float() - want.float()).abs().max() <= tol
        else:
            assert torch.equal(got, want), f"layer {layer.ordinal}: max diff {(got.float() - want.float()).abs().max()}"


def test_predict_is_the_routers_choice():
    model = tiny_model("deepseek_v3")  # grouped top-k with correction bias
    adapter = adapter_for(model)
    layer = adapter.find_layers(model)[0]
    hidden = torch.randn(5, model.config.hidden_size)
    assert torch.equal(layer.predict(hidden), layer.router(hidden)[2])


def test_switch_dropped_tokens_get_zero_weight():
    adapter = adapter_for(tiny_model("switch_transformers"))
    dispatch = torch.zeros(3, 1, 4)
    dispatch[0, 0, 2] = 1
    dispatch[2, 0, 1] = 1  # token 1 was dropped by capacity
    ids, weights = adapter.read_routing(dispatch, torch.tensor([[0.5], [0.7], [0.9]]))
    assert ids.tolist() == [[2], [0], [1]]
    assert torch.equal(weights, torch.tensor([[0.5], [0.0], [0.9]]))


def test_gpt_oss_deinterleave_round_trip():
    hidden, inter = 4, 3
    w = torch.arange(hidden * 2 * inter, dtype=torch.float32).view(hidden, 2 * inter)  # [H, 2I], gate at even cols
    canon = canonical_gate_up(w)
    assert torch.equal(canon[:inter], w[:, 0::2].t()) and torch.equal(canon[inter:], w[:, 1::2].t())
    b = torch.arange(2 * inter, dtype=torch.float32)
    assert canonical_gate_up_bias(b).tolist() == [0, 2, 4, 1, 3, 5]
    assert torch.equal(canonical_down(w), w.t())


def test_unsupported_activation():
    model = tiny_model("olmoe")
    model.config.hidden_act = "gelu_new"
    adapter = adapter_for(model)
    with pytest.raises(ValueError, match="activation 'gelu_new' is not supported; supported:"):
        adapter.expert_format(model, adapter.find_layers(model)[0])
