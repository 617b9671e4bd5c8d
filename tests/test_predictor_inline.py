"""Inline decode (``RunAheadPrefetcher(inline_decode=...)``): decode tokens predicted on the inference
thread through the graphed step (eager on the CPU) and the engine's deferred prefetches, against the
predictor thread's path: the same predictions, corrections, metrics and tokens."""

from __future__ import annotations

import pytest
import torch

from sida_moe.offload import engine_of, offload
from sida_moe.predictor import GraphedDecoder, HashPredictor, PredictorConfig, RunAheadPrefetcher
from sida_moe.predictor.graphed import GraphedLookahead

from test_predictor import tiny_qwen3


def _predictor(seed: int, previous_token: bool = True, attn_blocks: int = 2) -> HashPredictor:
    """A tiny predictor with lookahead heads whose corrections change the predictions."""
    torch.manual_seed(seed)
    pred = HashPredictor(PredictorConfig(input_dim=32, num_moe_layers=3, num_experts=8, top_k=2, hidden=16,
                                         attn_blocks=attn_blocks, attn_heads=4))
    heads = pred.add_lookahead(16, previous_token=previous_token)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        heads.w_out.copy_(torch.randn(heads.w_out.shape, generator=g))
        heads.b_out.copy_(torch.randn(heads.b_out.shape, generator=g))
    return pred.eval()


def _generate(model, x, n):
    with torch.no_grad():
        return model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)


def _run(prefetcher, prompts, n, seed=21, device="cpu"):
    """Generate ``n`` tokens after each prompt (one sequence after another). Returns, per
    generation, the experts the engine was asked to prefetch -- {(lane, layer): set}, corrections
    minus that forward's prediction -- plus the metrics and the tokens. Each layer 0 waits for the
    predictions so far (deterministic metrics)."""
    model = tiny_qwen3(seed=seed)
    if device == "cuda":
        model = model.half().cuda()
    offload(model, gpu_budget=0.5, policy="predictive", prefetch=prefetcher)
    engine = engine_of(model)
    asked: dict[int, dict[tuple[str, int], set[int]]] = {}
    prefetch, deferred = engine.prefetch, engine.prefetch_deferred

    def note(generation, priority, layer, experts):
        asked.setdefault(generation, {}).setdefault((priority, layer), set()).update(experts)

    def spy_prefetch(layer, experts, priority="prefetch", generation=None):
        note(generation, priority, layer, experts)
        return prefetch(layer, experts, priority, generation)

    def spy_deferred(ids, layers, priority="prefetch", generation=None, **kw):
        # on the CPU the programs ran eagerly: the ids are final when the call is made
        for layer, row in zip(layers, ids.reshape(len(layers), -1).tolist()):
            note(generation, priority, layer, row)
        return deferred(ids, layers, priority, generation, **kw)

    engine.prefetch, engine.prefetch_deferred = spy_prefetch, spy_deferred
    inline_jobs = []  # forwards predicted by native programs: read back from the device and the cache

    def probe(job) -> None:
        """A native forward's corrections: the lookahead programs' static outputs, until the next
        forward's layers run."""
        torch.cuda.synchronize()
        lookahead = prefetcher._lookaheads.get(job.embeds.shape[0])
        for layer in ([] if lookahead is None else lookahead.layers):
            note(job.generation, "demand", layer, lookahead.ids(layer).reshape(-1).tolist())

    def on_time(module, args):
        assert prefetcher.wait_idle(10)
        if inline_jobs:
            probe(inline_jobs.pop())
        job = prefetcher._current
        if job is not None and job.inline and prefetcher._programs_for(engine, job.embeds.shape[0]) is not None:
            # its prediction, as the cache remembers it (the newest generation's only)
            for layer in prefetcher._all_layers:
                note(job.generation, "prefetch", layer, engine.cache.deferred_predicted(job.generation, layer))
            inline_jobs.append(job)

    handle = model.model.layers[0].register_forward_pre_hook(on_time)
    try:
        tokens = []
        for x in prompts:
            tokens.append(_generate(model, x.to(device), n))
            assert prefetcher.wait_idle(10)
            if inline_jobs:
                probe(inline_jobs.pop())
        metrics = prefetcher.metrics()
    finally:
        handle.remove()
        engine.close()
    for lanes in asked.values():  # corrections as the thread queues them: what the prediction lacks
        for (lane, layer), experts in list(lanes.items()):
            if lane == "demand":
                experts -= lanes.get(("prefetch", layer), set())
                if not experts:
                    del lanes[(lane, layer)]
    return asked, metrics, tokens


PROMPTS = [torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(s)) for s in (5, 6)]


@pytest.mark.parametrize("previous_token,attn_blocks", [(True, 2), (False, 0)])
def test_inline_decode_matches_the_thread(previous_token, attn_blocks):
    pred = _predictor(31, previous_token, attn_blocks)
    runs = {}
    for inline in (False, True):
        prefetcher = RunAheadPrefetcher(pred, cuda_graph=True, graph_max_len=64, inline_decode=inline)
        runs[inline] = _run(prefetcher, PROMPTS, n=6)
    (t_asked, t_m, t_tok), (i_asked, i_m, i_tok) = runs[False], runs[True]
    assert all(torch.equal(a, b) for a, b in zip(t_tok, i_tok))
    assert t_asked == i_asked  # every forward: the same prediction and corrections
    assert any(lane == "demand" for lanes in i_asked.values() for lane, _ in lanes)  # corrections happened
    assert i_m["inline_forwards"] == 10 and t_m["inline_forwards"] == 0  # 5 decode forwards per sequence
    assert i_m["native_forwards"] == 0  # no CUDA graphs to launch natively on the CPU
    assert i_m["graph_steps"] == t_m["graph_steps"] == 10
    for key in ("hit_rate", "precision", "late_fraction", "forwards"):
        assert i_m[key] == t_m[key], key


@pytest.mark.gpu
def test_inline_decode_on_cuda_matches_the_thread():
    """On the GPU: captured graphs on a side stream, ids copied to the host by the engine's thread."""
    pred = _predictor(41)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        runs = {}
        for inline in (False, True):
            prefetcher = RunAheadPrefetcher(pred, inline_decode=inline)
            runs[inline] = _run(prefetcher, PROMPTS, n=6, device="cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    (t_asked, t_m, t_tok), (i_asked, i_m, i_tok) = runs[False], runs[True]
    assert all(torch.equal(a, b) for a, b in zip(t_tok, i_tok))
    # the first token after each prompt sets the previous-token state on the Python side too
    assert i_m["inline_forwards"] == 10 and i_m["native_forwards"] == 10
    assert t_asked == i_asked
    for key in ("hit_rate", "precision", "late_fraction"):
        assert i_m[key] == t_m[key], key


def test_inline_decode_past_capacity_continues_on_the_thread():
    """A sequence outgrowing ``graph_max_len`` leaves inline decode for the thread's eager path
    with the decoder's state: the same predictions as the thread path all along."""
    pred = _predictor(33)
    runs = {}
    for inline in (False, True):
        prefetcher = RunAheadPrefetcher(pred, cuda_graph=True, graph_max_len=9, inline_decode=inline)
        runs[inline] = _run(prefetcher, PROMPTS[:1], n=8)
    (t_asked, t_m, _), (i_asked, i_m, _) = runs[False], runs[True]
    assert i_m["inline_forwards"] == 3 and i_m["graph_steps"] == 3  # positions 6, 7, 8
    assert t_asked == i_asked


@pytest.mark.parametrize("kwargs,match", [
    (dict(correction="gate", cuda_graph=True), "correction='gate'"),
    (dict(hash_routing=True, cuda_graph=True), "hash routing"),
    (dict(cuda_graph=False), "graphed decoder"),
])
def test_inline_decode_true_says_why_it_cannot_apply(kwargs, match):
    prefetcher = RunAheadPrefetcher(_predictor(35), inline_decode=True, **kwargs)
    with pytest.raises(ValueError, match=f"inline_decode=True: .*{match}"):
        offload(tiny_qwen3(seed=3), gpu_budget=0.5, prefetch=prefetcher)


def test_graphed_lookahead_equals_look_ahead():
    """The per-layer correction programs give ``HashPredictor.look_ahead``'s top-k on the decoder's
    logits and previous-token state."""
    pred = _predictor(37)
    decoder = GraphedDecoder(pred, 2, 16, first_head=True)
    lookahead = GraphedLookahead(decoder)
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        _, state = pred(torch.randn(2, 4, 32, generator=g))
        assert decoder.load(state)
        previous = torch.randn(2, 32, generator=g)
        decoder.set_previous(previous)
        embeds = torch.randn(2, 1, 32, generator=g)
        logits, ids = decoder.step(embeds)
        want0 = pred.look_ahead(logits[0, :, 0], 0, embeds[:, 0], previous).topk(2, dim=-1).indices
        assert torch.equal(ids[0, :, 0], want0)  # layer 0 from its head, inside the step
        for layer in (1, 2):
            hidden = torch.randn(2, 32, generator=g)
            got = lookahead.run(layer, hidden)
            want = pred.look_ahead(logits[layer, :, 0], layer, hidden, previous).topk(2, dim=-1).indices
            assert torch.equal(got, want), layer
        assert torch.equal(decoder._previous, hidden)  # the last layer's input: the next token's previous
    with pytest.raises(ValueError, match="layer must be in"):
        lookahead.run(0, hidden)
    with pytest.raises(ValueError, match="hidden must hold"):
        lookahead.run(1, torch.zeros(3, 32))
    with pytest.raises(ValueError, match="previous must hold"):
        decoder.set_previous(torch.zeros(3, 32))
    with pytest.raises(ValueError, match="first_head=True needs"):
        GraphedDecoder(_predictor(37, previous_token=False), 1, first_head=True)


def test_engine_prefetch_deferred_checks_its_tensor():
    model = tiny_qwen3(seed=4)
    offload(model, gpu_budget=0.5)
    engine = engine_of(model)
    try:
        for ids, layers, match in [
            (torch.zeros(2, 2, dtype=torch.int32), [0, 1], "int64"),
            (torch.zeros(2, 4, dtype=torch.int64)[:, ::2], [0, 1], "contiguous"),
            (torch.zeros(3, dtype=torch.int64), [0, 1], "whole row"),
        ]:
            with pytest.raises(ValueError, match=match):
                engine.prefetch_deferred(ids, layers)
        engine.prefetch_deferred(torch.tensor([[1, 2]]), [0], "demand")
        assert engine.wait_deferred(10)
        engine.cache.synchronize()
        assert {(0, 1), (0, 2)} <= set(engine.cache.resident())
    finally:
        engine.close()
