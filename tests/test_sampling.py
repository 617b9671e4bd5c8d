"""Sampling in the static decode loop (``sida_moe.sampling``): the filters keep what
transformers' warpers keep with the same probabilities, the draw is ``torch.multinomial``'s, and
sampled generation gives transformers' own sampled tokens under the same seed."""

import copy

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from _moe_models import eager_experts, tiny_model
import sida_moe
from sida_moe.decode_graph import static_generate
from sida_moe.generate_route import plain_call
from sida_moe.sampling import SamplerState, SamplingParams, next_tokens, sampling_probs

CASES = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.6, 20, 0.95), (1.0, 1, 1.0), (2.0, 3, 0.5), (1.0, 100, 0.3)]


def _state(params):
    state = SamplerState(torch.device("cpu"))
    state.set(params)
    return state


def _transformers_probs(logits, temperature, top_k, top_p):
    scores = logits.clone()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(dim=-1)


@pytest.mark.parametrize("temperature,top_k,top_p", CASES)
def test_filters_keep_what_transformers_keeps_with_its_probabilities(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g) * 3
    logits[0, 7] = logits[0, 3]  # a tie
    want = _transformers_probs(logits, temperature, top_k, top_p)
    got = sampling_probs(logits, _state(SamplingParams(temperature, top_k, top_p)))
    assert torch.equal(got, want)  # the same ops in the same order


def test_the_draw_is_multinomials_and_follows_the_probabilities():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2]])
    state = _state(SamplingParams(0.9, 6, 0.97))
    probs = sampling_probs(logits, state)
    torch.manual_seed(0)
    want = torch.multinomial(probs.expand(200_000, -1), 1)
    torch.manual_seed(0)
    draws = next_tokens(logits.expand(200_000, -1), state)
    assert torch.equal(draws, want)
    freq = torch.bincount(draws.flatten(), minlength=8).double() / draws.numel()
    assert freq[probs[0] == 0].sum() == 0  # filtered tokens are never drawn
    assert (freq - probs[0].double()).abs().max() < 0.005  # 200k draws: ~5 standard deviations


@pytest.mark.parametrize("bad,message", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
])
def test_bad_sampling_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


def test_generate_calls_resolve_sampling_like_transformers():
    model = tiny_model("qwen3_moe")
    ids = torch.zeros(1, 3, dtype=torch.long)
    model.generation_config.do_sample = False
    assert plain_call(model, (ids,), {"max_new_tokens": 4})[4] is None
    # do_sample with nothing set: transformers' defaults (top-k 50)
    assert plain_call(model, (ids,), {"max_new_tokens": 4, "do_sample": True})[4] == SamplingParams(1.0, 50, 1.0)
    model.generation_config.update(do_sample=True, temperature=0.6, top_k=20, top_p=0.95)
    assert plain_call(model, (ids,), {"max_new_tokens": 4})[4] == SamplingParams(0.6, 20, 0.95)
    assert plain_call(model, (ids,), {"max_new_tokens": 4, "top_p": 0.5})[4] == SamplingParams(0.6, 20, 0.5)
    # warpers the loop does not have keep transformers' generate
    model.generation_config.min_p = 0.1
    assert plain_call(model, (ids,), {"max_new_tokens": 4}) is None


@pytest.mark.parametrize("params", [SamplingParams(1.0, 0, 1.0), SamplingParams(0.7, 5, 0.9), SamplingParams(1.3, 50, 0.8)])
def test_sampled_generation_gives_transformers_sampled_tokens_under_the_same_seed(params):
    original = eager_experts(tiny_model("qwen3_moe"))
    offloaded = sida_moe.offload(copy.deepcopy(original), gpu_budget="40%", policy="lru", prefetch="none")
    ids = torch.randint(3, 90, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.manual_seed(11)
        want = original.generate(ids, max_new_tokens=12, do_sample=True, temperature=params.temperature,
                                 top_k=params.top_k, top_p=params.top_p, pad_token_id=0)
        torch.manual_seed(11)
        got = static_generate(offloaded, ids, 12, graphs=False, sampling=params)
    assert torch.equal(got, want)


def test_sampled_generation_repeats_under_a_seed_and_is_greedy_at_top_k_1():
    offloaded = sida_moe.offload(copy.deepcopy(eager_experts(tiny_model("qwen3_moe"))), gpu_budget="40%",
                                 policy="lru", prefetch="none")
    ids = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(3))
    warm = SamplingParams(temperature=1.5, top_k=0, top_p=1.0)
    with torch.inference_mode():
        greedy = static_generate(offloaded, ids, 12, graphs=False)
        assert torch.equal(static_generate(offloaded, ids, 12, graphs=False, sampling=SamplingParams(1.0, 1, 1.0)), greedy)
        runs = []
        for seed in (7, 7, 8):
            torch.manual_seed(seed)
            runs.append(static_generate(offloaded, ids, 12, graphs=False, sampling=warm))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    assert not torch.equal(runs[0], greedy)
    assert torch.equal(runs[0][:, :5], ids)


@pytest.mark.gpu
def test_graphed_sampling_repeats_under_a_seed_and_is_greedy_at_top_k_1():
    offloaded = sida_moe.offload(copy.deepcopy(tiny_model("qwen3_moe", torch.float16)).cuda(), gpu_budget="25%",
                                 policy="lru", prefetch="none")
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(4)).cuda()
    with torch.inference_mode():
        greedy = offloaded.generate(ids, max_new_tokens=24, do_sample=False, sida_graphs=True)
        top1 = offloaded.generate(ids, max_new_tokens=24, do_sample=True, top_k=1, sida_graphs=True)
        runs = []
        for seed in (7, 7, 8):
            torch.manual_seed(seed)
            runs.append(offloaded.generate(ids, max_new_tokens=24, do_sample=True, temperature=1.5, top_k=0,
                                           sida_graphs=True))
    assert torch.equal(top1, greedy)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    # replays advance the device generator as transformers' eager steps do: its own sampled tokens
    # (fp16: this model's greedy tokens already agree with transformers', see test_decode_table)
    original = tiny_model("qwen3_moe", torch.float16).cuda()
    with torch.inference_mode():
        torch.manual_seed(7)
        want = original.generate(ids, max_new_tokens=24, do_sample=True, temperature=1.5, top_k=0)
    assert torch.equal(runs[0], want)
    # greedy and sampled steps are captured apart; each replayed
    assert {key.sampled for key, step in offloaded._sida_decode_steps.items() if step.graph is not None} == {False, True}
