"""Prefetchers: the engine calls the protocol at the documented points; next-layer gate prefetches
and scores itself; a hash-routing prefetcher changes routing through ``route``."""

import copy

import pytest
import torch

from _moe_models import eager_experts, forward_logits, greedy, prompt_batch, tiny_model
import sida_moe
from sida_moe.prefetchers import NextLayerGate, NoPrefetch, make_prefetcher


class Recorder:
    """A Prefetcher that records the calls it gets."""

    name = "recorder"

    def __init__(self):
        self.calls = []

    def attach(self, engine):
        self.engine = engine
        self.calls.append(("attach",))

    def begin_forward(self, inputs_embeds, attention_mask):
        self.calls.append(("begin", tuple(inputs_embeds.shape), None if attention_mask is None else tuple(attention_mask.shape)))

    def after_routing(self, moe_layer, hidden, topk_ids):
        self.calls.append(("after", moe_layer, tuple(topk_ids.shape)))

    def route(self, moe_layer, hidden, topk_ids, topk_weights):
        self.calls.append(("route", moe_layer))
        return topk_ids, topk_weights

    def close(self):
        self.calls.append(("close",))


def test_protocol_call_order():
    rec = Recorder()
    model = sida_moe.offload(tiny_model("qwen3_moe"), gpu_budget=1.0, prefetch=rec)
    assert isinstance(rec, sida_moe.Prefetcher)
    ids, mask = prompt_batch()
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
    assert rec.calls[0] == ("attach",)
    assert rec.calls[1] == ("begin", (2, 6, 32), (2, 6))
    layers = [c for c in rec.calls[2:]]
    assert layers == [c for m in range(3) for c in (("route", m), ("after", m, (12, 3)))]
    model.sida_engine.close()
    assert rec.calls[-1] == ("close",)


def test_begin_forward_with_inputs_embeds():
    rec = Recorder()
    model = sida_moe.offload(tiny_model("olmoe"), gpu_budget=1.0, prefetch=rec)
    embeds = model.get_input_embeddings()(torch.tensor([[4, 5, 6]]))
    rec.calls.clear()
    with torch.inference_mode():
        model(inputs_embeds=embeds)
    assert rec.calls[0] == ("begin", (1, 3, 32), None)
    assert sum(c[0] == "begin" for c in rec.calls) == 1


def test_encoder_decoder_calls_begin_per_stack():
    rec = Recorder()
    model = sida_moe.offload(tiny_model("switch_transformers"), gpu_budget=1.0, prefetch=rec)
    ids, mask = prompt_batch()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    begins = [c for c in rec.calls if c[0] == "begin"]
    assert begins[0] == ("begin", (2, 6, 32), (2, 6))  # encoder, once
    assert all(b[1][1] == 1 for b in begins[1:]) and len(begins) >= 3  # decoder steps with the KV cache


def test_next_layer_gate_prefetches_and_reports_hit_rate():
    model = sida_moe.offload(tiny_model("qwen3_moe"), gpu_budget=0.5, prefetch="next_layer_gate")
    engine = model.sida_engine
    ids, mask = prompt_batch()
    with torch.inference_mode():
        greedy(model, ids, mask, 5)
    stats = engine.stats()
    assert stats["prefetcher"] == "next_layer_gate"
    assert stats["prefetch_issued"] > 0
    assert 0.0 < stats["prefetch_hit_rate"] <= 1.0 and 0.0 < stats["prefetch_precision"] <= 1.0
    assert stats["prefetch_scored_experts"] > 0


def test_next_layer_gate_predicts_with_the_next_router():
    """With identical routers in every layer, the prediction made from layer L's input for layer
    L+1 is layer L's own choice; with the residual stream barely changing, hit rate is high."""
    model = tiny_model("qwen3_moe")
    routers = [layer.mlp.gate for layer in model.model.layers]
    for r in routers[1:]:
        r.weight.data.copy_(routers[0].weight.data)
    gate = NextLayerGate()
    model = sida_moe.offload(model, gpu_budget=0.5, prefetch=gate)
    with torch.inference_mode():
        model(input_ids=torch.tensor([[7, 8, 9, 10]]))
    m = gate.metrics()
    assert m["scored_experts"] > 0 and m["hit_rate"] > 0.3


def test_next_layer_gate_idle_when_everything_fits():
    model = sida_moe.offload(tiny_model("qwen3_moe"), gpu_budget=1.0, prefetch="next_layer_gate")
    ids, mask = prompt_batch()
    with torch.inference_mode():
        greedy(model, ids, mask, 3)
    stats = model.sida_engine.stats()
    assert stats["prefetch_issued"] == 0 and stats["prefetch_scored_experts"] == 0


def test_hash_routing_changes_outputs_exact_does_not():
    class ForceExpertZero(NoPrefetch):
        name = "force0"

        def route(self, moe_layer, hidden, topk_ids, topk_weights):
            return torch.zeros_like(topk_ids), topk_weights

    original = eager_experts(tiny_model("mixtral"))
    ids, mask = prompt_batch()
    exact = sida_moe.offload(copy.deepcopy(original), gpu_budget=1.0, prefetch=NoPrefetch())
    hashed = sida_moe.offload(copy.deepcopy(original), gpu_budget=1.0, prefetch=ForceExpertZero())
    with torch.inference_mode():
        want = forward_logits(original, ids, mask)
        assert torch.equal(forward_logits(exact, ids, mask), want)
        assert not torch.allclose(forward_logits(hashed, ids, mask), want)
    assert hashed.sida_engine.stats()["misses"] == 3  # one expert per layer ever used


def test_make_prefetcher():
    assert isinstance(make_prefetcher("none"), NoPrefetch)
    assert isinstance(make_prefetcher(None), NoPrefetch)
    assert isinstance(make_prefetcher("next_layer_gate"), NextLayerGate)
    with pytest.raises(ValueError, match="lookahead"):
        NextLayerGate(lookahead=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "gpt_oss", "qwen2_moe"])
def test_next_layer_gate_predictions_are_not_router_outputs(family):
    """With ``output_router_logits`` the model returns every router's logits (and an aux loss from
    them); the next-layer gate runs routers too, and those calls must not be recorded."""
    original = eager_experts(tiny_model(family, torch.float32, output_router_logits=True))
    offloaded = sida_moe.offload(copy.deepcopy(original), gpu_budget=0.5, prefetch="next_layer_gate")
    ids, mask = prompt_batch()
    with torch.inference_mode():
        want, got = original(input_ids=ids, attention_mask=mask), offloaded(input_ids=ids, attention_mask=mask)
    assert len(got.router_logits) == len(want.router_logits)
    for a, b in zip(want.router_logits, got.router_logits):  # fp32: within the exact-mode tolerance
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * a.abs().max())
    assert torch.allclose(want.aux_loss, got.aux_loss, rtol=1e-5)
    assert offloaded.sida_engine.prefetcher.metrics()["scored_experts"] > 0  # the gate did run
    offloaded.sida_engine.close()
