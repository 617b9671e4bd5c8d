"""The predictor's hooks on every decoder family the adapters serve (tiny random models, CPU): the
MoE layers it sees, traces recording the routing each model used, hash routing replacing it; and
the layers of an offloaded model."""

from __future__ import annotations

import copy

import pytest
import torch

from _moe_models import FAMILIES, eager_experts, tiny_model
from sida_moe.adapters import decoder_moe_layers
from sida_moe.predictor import HashPredictor, HashRouting, PredictorConfig
from sida_moe.train import RoutingRecorder, load_traces, record_traces

DECODER_FAMILIES = sorted(f for f in FAMILIES if f != "switch_transformers")
# tiny configs: 3 decoder layers; qwen2 keeps layer 1 dense, deepseek layer 0
DECODER_LAYERS = {"qwen2_moe": [0, 2], "deepseek_v3": [1, 2]}


def _rigged_predictor(layers, favourites: list[int]) -> HashPredictor:
    """Constant logits: ``favourites`` first, in that order, in every layer."""
    E, L = layers[0].num_experts, len(layers)
    p = HashPredictor(PredictorConfig(input_dim=32, num_moe_layers=L, num_experts=E, top_k=layers[0].top_k, hidden=16))
    with torch.no_grad():
        p.heads.weight.zero_()
        bias = p.heads.bias.view(L, E)
        bias.fill_(-5.0)
        for rank, e in enumerate(favourites):
            bias[:, e] = 3.0 - rank
    return p.eval()


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_the_predictor_hooks_every_decoder_family(family, tmp_path):
    model = tiny_model(family)
    layers = decoder_moe_layers(model)
    assert [l.ordinal for l in layers] == list(range(len(layers)))
    assert [l.decoder_layer for l in layers] == DECODER_LAYERS.get(family, [0, 1, 2])
    x = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))

    # the recorder keeps the ids each router chose (what the experts module received)
    chosen: dict[int, torch.Tensor] = {}
    hooks = [l.router.register_forward_hook(lambda m, a, out, i=i: chosen.__setitem__(i, out[2]))
             for i, l in enumerate(layers)]
    try:
        with torch.no_grad(), RoutingRecorder(model) as rec:
            exact = model(input_ids=x).logits
    finally:
        for h in hooks:
            h.remove()
    for i, layer in enumerate(layers):
        assert torch.equal(rec.layer_topk(i), chosen[i].reshape(-1, layer.top_k))
        assert rec.layer_logits(i).shape == (x.numel(), layer.num_experts)

    # the trace names the decoder layers of its MoE layers
    manifest = record_traces(model, x, tmp_path, batch_size=2, top_t=4, progress=False)
    assert manifest["moe_layer_ids"] == [l.decoder_layer for l in layers]
    assert torch.equal(load_traces(tmp_path).topk_ids[0].reshape(-1, layers[0].top_k), chosen[0].reshape(-1, layers[0].top_k))

    # hash routing: every experts module gets the predictor's experts instead
    favourites = [4, 1, 5][: layers[0].top_k]
    pred = _rigged_predictor(layers, favourites)
    for weights in ("predicted", "router"):
        with torch.no_grad(), HashRouting(model, pred, weights), RoutingRecorder(model) as rec:
            hashed = model(input_ids=x).logits
        for i in range(len(layers)):
            assert rec.layer_topk(i).sort(-1).values.unique(dim=0).tolist() == [sorted(favourites)]
        assert torch.isfinite(hashed).all() and not torch.allclose(hashed, exact)


def test_encoder_decoder_models_are_refused():
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        decoder_moe_layers(tiny_model("switch_transformers"))


def test_a_dense_model_is_named_with_the_supported_architectures():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="no MoE blocks found in LlamaForCausalLM: unsupported architecture 'llama'"):
        decoder_moe_layers(dense)


def test_an_offloaded_model_gives_its_engines_layers():
    """Offloading swaps the experts modules; the layers, and hooks put on them afterwards, follow."""
    import sida_moe
    from sida_moe.experts import OffloadedExperts

    model = sida_moe.offload(copy.deepcopy(eager_experts(tiny_model("qwen3_moe"))), gpu_budget="50%", policy="lru",
                             prefetch="none", copy_workers=0)
    engine = sida_moe.engine_of(model)
    try:
        layers = decoder_moe_layers(model)
        assert layers == engine.moe_layers
        assert all(isinstance(l.experts, OffloadedExperts) for l in layers)
        x = torch.randint(3, 90, (1, 5))
        with torch.no_grad(), RoutingRecorder(model) as rec:
            model(input_ids=x)
        assert all(rec.layer_topk(i).shape == (5, layers[i].top_k) for i in range(len(layers)))
        assert rec.topk_ids[0], "the recorder's hook on the offloaded experts module ran"
    finally:
        engine.close()
