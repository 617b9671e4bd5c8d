"""``SidaPrefetcher`` against a real offloaded tiny model (host backend on the CPU), in both decode
loops: the greedy loop (``sida_moe.decode_graph.static_generate``, eager here: each decode token is
predicted at the end of the step before it, ``predict_ahead``) and transformers' ``generate`` (an
eager loop: the token is predicted in ``begin_forward``). Predictions reach the cache through
``engine.prefetch_deferred`` and are scored natively against each decode step's routing."""

from __future__ import annotations

import pytest
import torch

from sida_moe.decode_graph import static_generate
from sida_moe.offloading import engine_of, offload
from sida_moe.predictor import (
    GraphedDecoder,
    HashPredictor,
    HashRouting,
    PredictorConfig,
    SidaPrefetcher,
    load_prefetcher,
)
from sida_moe.train import RoutingRecorder
from sida_moe.predictor import prefetcher as prefetcher_module
from sida_moe.prefetchers import Prefetcher

from test_predictor import tiny_qwen3

L, E, K = 3, 8, 2  # tiny_qwen3: MoE layers, experts, top-k
LOOPS = ["greedy", "eager"]


def _predictor(seed: int = 1, attn_blocks: int = 0, **kw) -> HashPredictor:
    torch.manual_seed(seed)
    return HashPredictor(PredictorConfig(input_dim=32, num_moe_layers=L, num_experts=E, top_k=K, hidden=16,
                                         attn_blocks=attn_blocks, attn_heads=4, **kw)).eval()


def _constant(scores: torch.Tensor, **kw) -> HashPredictor:
    """A predictor whose logits are ``scores [L, E]`` for every token (zero head weights, the
    scores as bias): its predictions are known in advance."""
    pred = _predictor(**kw)
    with torch.no_grad():
        pred.heads.weight.zero_()
        pred.heads.bias.copy_(scores.reshape(-1))
    return pred


def _generate(model, x, n=5, mask=None, loop="eager"):
    """``n`` greedy tokens after ``x``: through ``static_generate`` (``loop="greedy"``, eager steps)
    or transformers' ``generate``."""
    if loop == "greedy":
        assert mask is None, "the greedy loop takes unpadded prompts"
        return static_generate(model, x, n, pad_token_id=0, graphs=False)
    with torch.no_grad():
        return model.generate(input_ids=x, attention_mask=torch.ones_like(x) if mask is None else mask,
                              max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def _record_predictions(prefetcher: SidaPrefetcher) -> list[torch.Tensor]:
    """Every decode token's predicted logits ``[L, B, E]``, in order (what ``_predict_token`` left in
    ``_logits``; on the CPU nothing is captured, so each call is one token)."""
    out: list[torch.Tensor] = []
    predict = prefetcher._predict_token

    def spy(x, compiled=False):
        rows = predict(x, compiled)
        out.append(prefetcher._logits.clone())
        return rows

    prefetcher._predict_token = spy
    return out


def _record_routing(prefetcher: SidaPrefetcher) -> list[list[torch.Tensor]]:
    """Per forward, each MoE layer's routed ids ``[T, k]`` (``after_routing`` sees the true routing;
    a forward starts at layer 0)."""
    forwards: list[list[torch.Tensor]] = []
    after = prefetcher.after_routing

    def spy(moe_layer, hidden, topk_ids):
        if moe_layer == 0:
            forwards.append([])
        forwards[-1].append(topk_ids.detach().clone())
        return after(moe_layer, hidden, topk_ids)

    prefetcher.after_routing = spy
    return forwards


def _full_logits(pred: HashPredictor, model, tokens: torch.Tensor, mask=None) -> torch.Tensor:
    """The predictor's logits ``[L, B, S, E]`` over the whole sequence ``tokens`` in one forward."""
    with torch.no_grad():
        # the table, not the module: calling the offloaded model's embedding module starts a forward
        embeds = model.get_input_embeddings().weight[tokens].float()
        logits, _ = pred(embeds, attention_mask=mask)
    return logits


def test_is_a_prefetcher():
    prefetcher = SidaPrefetcher(_predictor())
    assert isinstance(prefetcher, Prefetcher)
    assert prefetcher.name == "sida" and prefetcher.k == K and prefetcher.feed_future and not prefetcher.hash_routing
    assert SidaPrefetcher(_predictor(), k=5).k == 5


@pytest.mark.parametrize("policy", ["lru", "predictive"])
@pytest.mark.parametrize("loop", LOOPS)
def test_exact_mode_keeps_outputs_and_prefetches(policy, loop):
    model = tiny_qwen3(seed=2)
    x = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        ref_logits = model(input_ids=x).logits
    ref_tokens = _generate(model, x)
    prefetcher = SidaPrefetcher(_predictor())
    offload(model, gpu_budget=0.5, policy=policy, prefetch=prefetcher)
    engine = engine_of(model)
    try:
        with torch.no_grad():
            logits = model(input_ids=x).logits
        assert torch.allclose(logits, ref_logits, atol=1e-4)
        assert torch.equal(_generate(model, x, loop=loop), ref_tokens)
        stats = engine.stats()
        m = prefetcher.metrics()
        assert stats["forwards"] == 1 + 5  # one full forward, then prefill + 4 decode steps
        assert stats["prefetch_queued"] + stats["prefetch_redundant"] > 0, "the predicted experts were queued"
        assert 0.0 <= m["hit_rate"] <= 1.0 and 0.0 <= m["precision"] <= 1.0
        assert m["scored_experts"] == 4 * L * K  # the decode tokens' predictions, each layer's k routed experts
        assert stats["prefetch_hit_rate"] == m["hit_rate"]  # engine.stats() carries the metrics
    finally:
        engine.close()


def _repeated_token_oracle(model, token: int = 7, length: int = 32):
    """A prompt of one token repeated: every position sees the same hidden states (attention averages
    identical values), so every position has the same routing, the same in decode when the token is
    fed again. Returns the prompt, the router logits ``[L, E]`` and a predictor that predicts exactly
    them for every token (an oracle of this sequence)."""
    x = torch.full((1, length), token)
    with torch.no_grad(), RoutingRecorder(model) as rec:
        model(input_ids=x)
    logits = torch.stack([rec.layer_logits(l) for l in range(L)])  # [L, T, E]
    assert torch.allclose(logits, logits[:, :1].expand_as(logits), atol=1e-5), "positions routed differently"
    return x, logits[:, 0], _constant(logits[:, 0])


def _teacher_forced(model, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Prefill ``x``, then ``steps`` cached decode forwards fed ``x``'s first token again (an eager
    loop); the logits of every forward's last position."""
    tok = x[:, :1]
    out = []
    with torch.no_grad():
        res = model(input_ids=x, use_cache=True)
        out.append(res.logits[:, -1])
        past, mask = res.past_key_values, torch.ones_like(x)
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            res = model(input_ids=tok, attention_mask=mask, past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(res.logits[:, -1])
    return torch.stack(out)


@pytest.mark.parametrize("hash_weights", ["predicted", "router"])
def test_oracle_predictions_are_all_hits_and_hash_routing_with_them_is_exact(hash_weights):
    """A predictor that knows the routing predicts exactly the used experts: recall and precision 1
    over every decode token; with hash routing on, the oracle's experts (and, as its logits are the
    router's, its weights) reproduce the exact model."""
    model = tiny_qwen3(seed=4)
    x, _, oracle = _repeated_token_oracle(model)
    exact = _teacher_forced(model, x, 4)
    prefetcher = SidaPrefetcher(oracle, hash_routing=True, hash_weights=hash_weights)
    offload(model, gpu_budget=1.0, policy="lru", prefetch=prefetcher)
    engine = engine_of(model)
    try:
        assert torch.allclose(_teacher_forced(model, x, 4), exact, atol=1e-4)
        m = prefetcher.metrics()
        assert (m["hit_rate"], m["precision"], m["scored_experts"]) == (1.0, 1.0, 4 * L * K)
    finally:
        engine.close()


@pytest.mark.parametrize("length", [32, 8])  # prefill through acquire / through the expert table
def test_prompt_predictions_are_prefetched_before_the_prompt_runs(length):
    """The prompt's predictions (``HashPredictor.forward`` in ``begin_forward``) reach the cache before
    its layers: with the oracle and the copies let land before layer 0, the prompt misses nothing,
    where demand loading misses every routed expert."""
    misses = {}
    for name in ("none", "sida"):
        model = tiny_qwen3(seed=4)
        x, _, oracle = _repeated_token_oracle(model, length=length)
        offload(model, gpu_budget=1.0, policy="lru", prefetch="none" if name == "none" else SidaPrefetcher(oracle))
        engine = engine_of(model)

        def landed(module, args):  # the deferred prefetches handled and their copies done
            assert engine.wait_deferred(10)
            engine.cache.synchronize()

        model.model.layers[0].register_forward_pre_hook(landed)
        try:
            with torch.no_grad():
                model(input_ids=x)
            stats = engine.stats()
            misses[name] = stats["misses"]
            assert stats["hits"] + stats["misses"] == L * K  # one routed row per layer: k experts
            if name == "sida":
                assert engine.prefetcher.metrics()["scored_experts"] == 0  # the prompt is not scored
        finally:
            engine.close()
    assert misses == {"none": L * K, "sida": 0}


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("batch,k", [(1, K), (1, 3), (2, K)])
def test_scores_equal_a_hand_count_over_the_decode_tokens(loop, batch, k):
    """A predictor of fixed experts P_l per layer, scored against the routing the engine computed:
    per decode token and layer, hits |routed & P_l|, needed |routed|, predicted |P_l| (a batch's
    rows together: distinct experts); the prompt is not scored. engine.reset_stats() zeroes them."""
    scores = torch.randn(L, E, generator=torch.Generator().manual_seed(3))
    prefetcher = SidaPrefetcher(_constant(scores), k=k)
    model = tiny_qwen3(seed=5)
    offload(model, gpu_budget=0.5, policy="lru", prefetch=prefetcher)
    engine = engine_of(model)
    forwards = _record_routing(prefetcher)
    predicted = [set(scores[l].topk(k).indices.tolist()) for l in range(L)]
    x = torch.randint(1, 64, (batch, 6), generator=torch.Generator().manual_seed(6))
    try:
        _generate(model, x, 6, loop=loop)
        m = prefetcher.metrics()
        stats = engine.stats()
        engine.reset_stats()
        after_reset = prefetcher.metrics(), engine.stats()
    finally:
        engine.close()
    assert len(forwards) == 6 and forwards[0][0].shape[0] == batch * 6  # prefill, then 5 decode steps
    hits = needed = total = 0
    for routing in forwards[1:]:
        for layer, ids in enumerate(routing):
            used = set(ids.flatten().tolist())
            hits += len(used & predicted[layer])
            needed += len(used)
            total += k
    assert (stats["predicted_hits"], stats["predicted_needed"], stats["predicted_experts"]) == (hits, needed, total)
    assert m == {"hit_rate": hits / needed, "precision": hits / total, "scored_experts": needed}
    assert 0.0 < m["hit_rate"] < 1.0, "scores whose count is informative"
    if batch == 1:
        assert needed == 5 * L * K  # every decode token: each layer's k distinct routed experts
    assert after_reset[0] == {"hit_rate": 0.0, "precision": 0.0, "scored_experts": 0.0}
    assert all(after_reset[1][f"predicted_{c}"] == 0 for c in ("hits", "needed", "experts"))


@pytest.mark.parametrize("loop", LOOPS)
def test_a_next_token_predictor_is_scored_against_the_token_it_names(loop):
    """A predictor of the next token's routing (target_shift=1): the prediction made from decode
    token j's input names token j+1 and is scored against that forward's routing (hand count over
    the recorded predictions and routing); the tokens stay the original model's."""
    prefetcher = SidaPrefetcher(_predictor(seed=21, target_shift=1))
    model = tiny_qwen3(seed=5)
    x = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(6))
    want = _generate(tiny_qwen3(seed=5), x, 8, loop=loop)
    offload(model, gpu_budget=0.5, policy="predictive", prefetch=prefetcher)
    engine = engine_of(model)
    forwards, predictions = _record_routing(prefetcher), _record_predictions(prefetcher)
    try:
        got = _generate(model, x, 8, loop=loop)
        engine.wait_deferred(10.0)
        stats = engine.stats()
    finally:
        engine.close()
    assert torch.equal(got, want)
    decode = forwards[1:]  # after the prompt's forward
    assert len(decode) == 7 and len(predictions) >= len(decode)
    hits = needed = total = 0
    for j in range(len(decode) - 1):  # prediction j (token j's input) against decode forward j + 1
        for layer in range(L):
            used = set(decode[j + 1][layer].flatten().tolist())
            named = set(predictions[j][layer].topk(K, dim=-1).indices.flatten().tolist())
            hits += len(used & named)
            needed += len(used)
            total += len(named)
    assert (stats["predicted_hits"], stats["predicted_needed"], stats["predicted_experts"]) == (hits, needed, total)
    assert needed == 6 * L * K
    with pytest.raises(ValueError, match="target_shift=1"):
        SidaPrefetcher(_predictor(target_shift=1), hash_routing=True)


@pytest.mark.parametrize("shift", [0, 1])
def test_a_replayed_steps_own_token_predictions_only_feed_the_policy(shift):
    """A replayed step's predictions (``hand_over_ahead(replayed=True)``) reach the cache after the
    step they name was launched: an own-token predictor's go as feed-only rows (copies would land
    after that step read the experts), a next-token predictor's as after-next rows with copies;
    the unreplayed greedy loop's (the CPU's) prefetch either way."""
    prefetcher = SidaPrefetcher(_predictor(seed=23, target_shift=shift))
    model = tiny_qwen3(seed=5)
    offload(model, gpu_budget=0.5, policy="predictive", prefetch=prefetcher)
    engine = engine_of(model)
    deferred, seen = engine.prefetch_deferred, []

    def spy(ids, layers, *a, **kw):
        seen.append((kw["feed_only"], kw["after_next"]))
        return deferred(ids, layers, *a, **kw)

    try:
        x = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(6))
        out = static_generate(model, x, 4, pad_token_id=0, graphs=False)
        engine.prefetch_deferred = spy
        with torch.inference_mode():  # as the greedy loop runs
            embeds = model.get_input_embeddings().weight[out[:, -1:]].float()
            assert prefetcher.predict_ahead(embeds)
            prefetcher.hand_over_ahead(replayed=False)
            assert prefetcher.predict_ahead(embeds)
            # no step is replayed on the CPU (no side step to launch): the replayed hand-over's
            # submission itself, as hand_over_ahead(replayed=True) makes it after the launch
            with pytest.raises(RuntimeError, match="no longer holds"):
                prefetcher.hand_over_ahead(replayed=True)
            prefetcher._submit(engine, prefetcher._rows, late=True)
        engine.wait_deferred(10.0)
    finally:
        engine.close()
    assert seen == [(False, bool(shift)), (not shift, bool(shift))]


@pytest.mark.parametrize("loop", LOOPS)
def test_hash_routing_matches_the_hook_version_in_generation(loop):
    """The engine path (route hook, predictor state carried across decode steps by the decoder) and
    the plain-model hooks give the same tokens; router-weighted hash routing too."""
    pred = _predictor(seed=5)
    model = tiny_qwen3(seed=6)
    x = torch.randint(0, 64, (1, 9))
    batch = torch.randint(1, 64, (2, 9))
    batch_mask = torch.ones_like(batch)
    batch_mask[0, :4] = 0  # a left-padded row
    with HashRouting(model, pred, "predicted", stateful=True) as hooks:
        expected = _generate(model, x, 6)
        hooks.reset()
        expected_batch = _generate(model, batch, 6, batch_mask)
    with HashRouting(model, pred, "router", stateful=True):
        expected_router_weighted = _generate(model, x, 6)
    with torch.no_grad():
        with HashRouting(model, pred, "predicted"):
            expected_logits = model(input_ids=x).logits
        with HashRouting(model, pred, "router"):
            expected_router_logits = model(input_ids=x).logits
        exact_logits = model(input_ids=x).logits
    prefetcher = SidaPrefetcher(pred, hash_routing=True)
    offload(model, gpu_budget=0.5, policy="lru", prefetch=prefetcher)
    engine = engine_of(model)
    try:
        with torch.no_grad():
            logits = model(input_ids=x).logits
        assert torch.allclose(logits, expected_logits, atol=1e-4)
        assert not torch.allclose(logits, exact_logits, atol=1e-3), "hash routing must change this model's output"
        assert torch.equal(_generate(model, x, 6, loop=loop), expected)
        if loop == "eager":
            assert torch.equal(_generate(model, batch, 6, batch_mask), expected_batch)
        assert not torch.allclose(expected_router_logits, expected_logits, atol=1e-3)
        engine.set_prefetcher(SidaPrefetcher(pred, hash_routing=True, hash_weights="router"))
        with torch.no_grad():
            assert torch.allclose(model(input_ids=x).logits, expected_router_logits, atol=1e-4)
        assert torch.equal(_generate(model, x, 6, loop=loop), expected_router_weighted)
    finally:
        engine.close()


def test_load_prefetcher_and_argument_checks(tmp_path):
    pred = _predictor()
    pred.save(tmp_path)
    prefetcher = load_prefetcher(tmp_path)
    assert prefetcher.predictor.config == pred.config and prefetcher.k == K
    loaded = load_prefetcher(tmp_path, k=4, feed_future=False, hash_routing=True, hash_weights="router")
    assert (loaded.k, loaded.feed_future, loaded.hash_routing, loaded.hash_weights) == (4, False, True, "router")
    for bad in (0, 9, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 8\]"):
            SidaPrefetcher(pred, k=bad)
    with pytest.raises(ValueError, match="hash_weights must be 'predicted' or 'router'"):
        SidaPrefetcher(pred, hash_routing=True, hash_weights="mean")
    with pytest.raises(TypeError, match="must be a HashPredictor"):
        SidaPrefetcher(torch.nn.Linear(2, 2))

    class Custom(HashPredictor):
        def forward(self, embeds, state=None, attention_mask=None):
            return super().forward(embeds, state, attention_mask)

    with pytest.raises(ValueError, match="cannot be served: .*overrides HashPredictor.forward"):
        SidaPrefetcher(Custom(pred.config))
    with pytest.raises(RuntimeError, match="before attach"):
        SidaPrefetcher(pred).begin_forward(torch.zeros(1, 3, 32), None)
    with pytest.raises(RuntimeError, match="before attach"):
        SidaPrefetcher(pred).predict_ahead(torch.zeros(1, 1, 32))
    assert SidaPrefetcher(pred).metrics() == {"hit_rate": 0.0, "precision": 0.0, "scored_experts": 0.0}
    with pytest.raises(ValueError, match="covers 3 MoE layers, the model has 2"):
        offload(tiny_qwen3(layers=2), gpu_budget=0.5, prefetch=SidaPrefetcher(pred))
    with pytest.raises(ValueError, match=r"predicts 8 experts per layer, the model has \[6\]"):
        offload(tiny_qwen3(experts=6), gpu_budget=0.5, prefetch=SidaPrefetcher(pred))
    # and when it replaces the prefetcher of an offloaded model
    model = offload(tiny_qwen3(layers=2), gpu_budget=0.5)
    engine = engine_of(model)
    try:
        with pytest.raises(ValueError, match="covers 3 MoE layers"):
            engine.set_prefetcher(SidaPrefetcher(pred))
    finally:
        engine.close()


@pytest.mark.parametrize("feed_future", [True, False])
def test_every_prediction_goes_through_prefetch_deferred(feed_future):
    """The prompt's rows (one per MoE layer, every prompt token's k experts) are prefetched
    unremembered; each decode token's are remembered for scoring; ``feed_future`` reaches every
    call. Both loops make the same calls."""
    calls = {}
    for loop in LOOPS:
        model = tiny_qwen3(seed=7)
        prefetcher = SidaPrefetcher(_predictor(seed=8), feed_future=feed_future)
        offload(model, gpu_budget=0.5, policy="predictive", prefetch=prefetcher)
        engine = engine_of(model)
        seen = calls[loop] = []
        deferred = engine.prefetch_deferred

        def spy(ids, layers, priority="prefetch", generation=None, **kw):
            seen.append((tuple(ids.shape), list(layers), kw))
            return deferred(ids, layers, priority, generation, **kw)

        engine.prefetch_deferred = spy
        try:
            _generate(model, torch.randint(1, 64, (1, 5), generator=torch.Generator().manual_seed(9)), 4, loop=loop)
        finally:
            engine.close()
    assert calls["eager"][0] == ((L, 5 * K), [0, 1, 2], {"future": feed_future, "forget": True})  # the prompt: unscored, and the last sequence's leftover forgotten
    decode = ((L, K), [0, 1, 2], {"future": feed_future, "remember": True, "feed_only": False, "after_next": False})
    assert calls["eager"][1:] == [decode] * 3  # 3 decode forwards
    # the greedy loop also predicts the token after the last step (its step is the same every time)
    assert calls["greedy"] == calls["eager"] + [decode]


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


@pytest.mark.parametrize("attn_blocks", [0, 2])
def test_padded_prompts_are_masked_for_the_predictor(attn_blocks):
    """A left-padded batch: the prompt's mask reaches the predictor, so each row's predictions equal
    those of the row alone with its padding masked."""
    pred = _predictor(seed=9, attn_blocks=attn_blocks)
    model = tiny_qwen3(seed=10)
    x = torch.randint(1, 64, (2, 7))
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    prefetcher = SidaPrefetcher(pred)
    offload(model, gpu_budget=0.5, prefetch=prefetcher)
    engine = engine_of(model)
    try:
        with torch.no_grad():
            model(input_ids=x, attention_mask=mask)
        got = prefetcher._logits  # [L, B * S, E] of the forward just run
        expected = _full_logits(pred, model, x, mask=mask)
        unmasked = _full_logits(pred, model, x)
        assert torch.allclose(got, expected.reshape(L, 14, E), atol=1e-5)
        assert not torch.allclose(got, unmasked.reshape(L, 14, E), atol=1e-3)
    finally:
        engine.close()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("attn_blocks,batch", [(0, 1), (2, 1), (2, 2)])
def test_decode_predictions_equal_one_full_sequence_forward(loop, attn_blocks, batch):
    """Each decode token's prediction (the decoder's fixed-shape step, on the CPU eagerly) equals the
    predictor's forward over the whole sequence at that position."""
    pred = _predictor(seed=11, attn_blocks=attn_blocks, head_hidden=24)
    model = tiny_qwen3(seed=12)
    prefetcher = SidaPrefetcher(pred)
    offload(model, gpu_budget=0.5, policy="predictive", prefetch=prefetcher)
    engine = engine_of(model)
    got = _record_predictions(prefetcher)
    x = torch.randint(1, 64, (batch, 7), generator=torch.Generator().manual_seed(3))
    try:
        tokens = _generate(model, x, 6, loop=loop)
        decoder = prefetcher._decoder  # close() drops it
        assert decoder is not None and decoder.length == 7 + len(got)
    finally:
        engine.close()
    # eager: 5 decode forwards; greedy: also the token after the last step
    assert len(got) == (6 if loop == "greedy" else 5)
    full = _full_logits(pred, model, tokens[:, : 7 + len(got)])
    for i, logits in enumerate(got):
        assert torch.allclose(logits, full[:, :, 7 + i], atol=1e-5), i


def test_prefetch_false_hands_decode_predictions_over_as_feed_only():
    """prefetch=False: every decode prediction goes to the cache as feed-only rows (scored and fed
    to the policy; the native side queues no loads for them: test_native_deferred), the prompt's
    still prefetches; tokens are the same either way."""
    x = torch.randint(1, 64, (1, 7), generator=torch.Generator().manual_seed(5))
    tokens, flags = {}, {}
    for prefetch in (True, False):
        model = tiny_qwen3(seed=17)
        offload(model, gpu_budget=0.25, policy="predictive", prefetch=SidaPrefetcher(_predictor(seed=18), prefetch=prefetch))
        engine = engine_of(model)
        deferred, seen = engine.prefetch_deferred, []

        def spy(ids, layers, *a, seen=seen, deferred=deferred, **kw):
            seen.append(kw.get("feed_only", False))
            return deferred(ids, layers, *a, **kw)

        engine.prefetch_deferred = spy
        try:
            tokens[prefetch] = static_generate(model, x, 12, pad_token_id=0, graphs=False)
            engine.wait_deferred(10.0)
            assert engine.stats()["predicted_needed"] > 0
        finally:
            engine.close()
        flags[prefetch] = seen
    assert torch.equal(tokens[True], tokens[False])
    assert flags[True] == [False] * len(flags[True])
    assert flags[False][0] is False and flags[False][1:] == [True] * (len(flags[False]) - 1)  # the prompt, then decode
    with pytest.raises(TypeError, match="prefetch must be a bool"):
        SidaPrefetcher(_predictor(), prefetch="no")


def test_left_padded_greedy_loop_predicts_from_each_rows_real_tokens():
    """The greedy loop's static mask (the prompt's columns, then ones, one length for every
    forward): the prompt is predicted under its padding, decode continues the sequence, and each
    decode token's prediction equals one masked forward over the whole sequence."""
    pred = _predictor(seed=15, attn_blocks=2, head_hidden=24)
    model = tiny_qwen3(seed=16)
    prefetcher = SidaPrefetcher(pred)
    offload(model, gpu_budget=0.5, policy="predictive", prefetch=prefetcher)
    engine = engine_of(model)
    got = _record_predictions(prefetcher)
    x = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    x[1, :3] = 0
    prompts = []
    predict_prompt = prefetcher._predict_prompt
    prefetcher._predict_prompt = lambda *a: prompts.append(1) or predict_prompt(*a)
    try:
        tokens = static_generate(model, x, 6, pad_token_id=0, graphs=False, attention_mask=mask)
        assert engine.stats()["predicted_needed"] > 0
    finally:
        engine.close()
    assert len(prompts) == 1  # one sequence: decode forwards were not taken for new prompts
    assert len(got) == 6
    full_mask = torch.cat([mask, torch.ones(2, len(got), dtype=mask.dtype)], dim=1)
    full = _full_logits(pred, model, tokens[:, : 7 + len(got)], mask=full_mask)
    for i, logits in enumerate(got):
        assert torch.allclose(logits, full[:, :, 7 + i], atol=1e-5), i


def _capped(prefetcher: SidaPrefetcher, capacity: int) -> None:
    """Let the greedy loop size the decoder at ``capacity`` tokens (it asks for its static cache's
    length, at least 256, more than the tiny model's 128 positions)."""
    begin = prefetcher.begin_sequence
    prefetcher.begin_sequence = lambda batch, length, **kw: begin(batch, capacity, **kw)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_sequence_past_the_decoders_capacity_continues_eagerly(loop, monkeypatch):
    """Capacity 9 for a 6-token prompt: the decoder steps positions 6, 7, 8, then its state goes to
    the eager forward; the predictions are still those of one full-sequence forward. A prompt that
    fills the capacity never uses the decoder. A new sequence starts from its own prompt only."""
    monkeypatch.setattr(prefetcher_module, "DEFAULT_CAPACITY", 9)  # the eager loop's size
    steps = []
    step = GraphedDecoder.step
    monkeypatch.setattr(GraphedDecoder, "step", lambda self, *a, **kw: steps.append(self.length) or step(self, *a, **kw))
    pred = _predictor(seed=13, attn_blocks=2, head_hidden=24)
    model = tiny_qwen3(seed=14)
    prefetcher = SidaPrefetcher(pred)
    if loop == "greedy":
        _capped(prefetcher, 9)
    offload(model, gpu_budget=0.5, prefetch=prefetcher)
    engine = engine_of(model)
    got = _record_predictions(prefetcher)
    g = torch.Generator().manual_seed(4)
    first, second = torch.randint(1, 64, (1, 6), generator=g), torch.randint(1, 64, (1, 4), generator=g)
    try:
        tokens = _generate(model, first, 8, loop=loop)
        assert steps == [6, 7, 8]
        assert prefetcher._decoder is None and prefetcher._state is not None  # continued eagerly
        predicted = len(got)
        assert predicted == (8 if loop == "greedy" else 7)
        full = _full_logits(pred, model, tokens[:, : 6 + predicted])
        for i, logits in enumerate(got):
            assert torch.allclose(logits, full[:, :, 6 + i], atol=1e-5), i

        # a new, shorter sequence: the decoder again, loaded from this prompt alone
        steps.clear()
        got.clear()
        tokens = _generate(model, second, 4, loop=loop)
        assert steps == list(range(4, 4 + len(got))) and prefetcher._decoder is not None
        full = _full_logits(pred, model, tokens[:, : 4 + len(got)])
        for i, logits in enumerate(got):
            assert torch.allclose(logits, full[:, :, 4 + i], atol=1e-5), i

        # a prompt that leaves the decoder no room: eager from its first decode token
        steps.clear()
        got.clear()
        long = torch.randint(1, 64, (1, 9), generator=g)
        tokens = _generate(model, long, 3, loop=loop)
        assert steps == [] and len(got) >= 2
        full = _full_logits(pred, model, tokens[:, : 9 + len(got)])
        for i, logits in enumerate(got):
            assert torch.allclose(logits, full[:, :, 9 + i], atol=1e-5), i
        assert engine.wait_deferred(10) and engine.feed.take_error() is None
    finally:
        engine.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_decode_steps_run_a_copy_of_the_predictor_in_decode_dtype(loop, monkeypatch):
    """``decode_dtype=torch.bfloat16`` (CUDA's default; float32 is the CPU's): decode steps run a
    bfloat16 copy of the predictor, the prompt the float32 predictor; predictions stay close to
    one float32 forward over the sequence, tokens stay exact, and a sequence past the decoder's
    capacity continues in float32 from the decoder's state."""
    monkeypatch.setattr(prefetcher_module, "DEFAULT_CAPACITY", 9)
    pred = _predictor(seed=13, attn_blocks=2, head_hidden=24)
    model = tiny_qwen3(seed=14)
    x = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(4))
    want = _generate(model, x, 8, loop=loop)
    prefetcher = SidaPrefetcher(pred, decode_dtype=torch.bfloat16)
    assert prefetcher.decode_dtype is None  # resolved at attach
    if loop == "greedy":
        _capped(prefetcher, 9)
    offload(model, gpu_budget=0.5, prefetch=prefetcher)
    engine = engine_of(model)
    got = _record_predictions(prefetcher)
    try:
        assert prefetcher.decode_dtype == torch.bfloat16 and pred.compress.weight.dtype == torch.float32
        tokens = _generate(model, x, 8, loop=loop)
        assert torch.equal(tokens, want)
        assert prefetcher._decoder is None and prefetcher._state.keys.dtype == torch.float32  # continued eagerly
        full = _full_logits(pred, model, tokens[:, : 6 + len(got)])
        for i, logits in enumerate(got):
            assert torch.allclose(logits.float(), full[:, :, 6 + i], atol=0.1), i
        assert any(lg.dtype == torch.bfloat16 for lg in got) and got[-1].dtype == torch.float32
        assert engine.wait_deferred(10) and engine.feed.take_error() is None
    finally:
        engine.close()
    assert SidaPrefetcher(_predictor()).decode_dtype is None
    with pytest.raises(ValueError, match="decode_dtype must be one of"):
        SidaPrefetcher(_predictor(), decode_dtype=torch.int8)


def test_a_dropped_decoder_is_found_again_while_a_captured_step_may_still_hold_it(monkeypatch):
    """The prefetcher keeps its newest few decoders; one dropped is found again (not rebuilt)
    while anything still holds it -- on CUDA a kept decode step's graph stages into its side
    step, whose launches must step that very decoder -- and rebuilt once nothing does."""
    import gc
    import weakref

    monkeypatch.setattr(prefetcher_module, "MAX_DECODERS", 2)
    model = tiny_qwen3(seed=5)
    prefetcher = SidaPrefetcher(_predictor(seed=23))
    offload(model, gpu_budget=0.5, prefetch=prefetcher)
    try:
        held = prefetcher._decoder_for(1, 16)
        others = [prefetcher._decoder_for(b, 16) for b in (2, 3)]
        assert (1, 16) not in prefetcher._decoders and len(prefetcher._decoders) == 2
        assert prefetcher._decoder_for(1, 16) is held  # found again, and the newest now
        assert list(prefetcher._decoders) == [(3, 16), (1, 16)]
        prefetcher._decoder_for(4, 16)
        prefetcher._decoder_for(5, 16)
        ref = weakref.ref(held)
        del held, others
        gc.collect()
        assert ref() is None  # dropped and held by nothing: the prefetcher did not keep it
        rebuilt = prefetcher._decoder_for(1, 16)
        assert rebuilt.batch == 1 and rebuilt.max_len == 16 and list(prefetcher._decoders) == [(5, 16), (1, 16)]
    finally:
        engine_of(model).close()


def test_a_new_greedy_sequence_scores_decode_tokens_only():
    """The greedy loop predicts one token past its last step; the next sequence's prompt forgets
    that prediction, so its table-path prefill is not scored against it."""
    prefetcher = SidaPrefetcher(_predictor())
    model = tiny_qwen3(seed=2)
    offload(model, gpu_budget=0.5, policy="predictive", prefetch=prefetcher)
    engine = engine_of(model)
    x = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))  # table-path prefill
    try:
        _generate(model, x, 6, loop="greedy")
        assert prefetcher.metrics()["scored_experts"] == 5 * L * K
        _generate(model, x, 6, loop="greedy")
        assert prefetcher.metrics()["scored_experts"] == 2 * 5 * L * K
    finally:
        engine.close()


@pytest.mark.gpu
def test_prefetcher_on_cuda_steps_the_decoder_beside_each_replayed_step():
    """On the GPU, each captured decode step stages the next token's prediction, and every replay
    launches the decoder's step beside the next one and hands the ids over: every decode token is
    scored, the decoder counts each step, it runs in bfloat16 (the CUDA default), and the tokens
    are the eager loop's."""
    pred = _predictor(seed=22, attn_blocks=2, head_hidden=24)
    model = tiny_qwen3(seed=23).half().cuda()
    prefetcher = SidaPrefetcher(pred)
    offload(model, gpu_budget=0.5, policy="predictive", prefetch=prefetcher)
    engine = engine_of(model)
    x = torch.randint(1, 64, (1, 7), device="cuda")
    try:
        if engine.expert_table is None:
            pytest.skip("no expert-table kernels here: decode acquires, and nothing is captured or scored")
        graphed = static_generate(model, x, 9, graphs=True)
        m = prefetcher.metrics()
        assert m["scored_experts"] == 8 * L * K and 0.0 <= m["hit_rate"] <= 1.0
        assert prefetcher.predictor.compress.weight.device.type == "cuda"  # moved at attach
        decoder = prefetcher._decoder
        assert decoder is not None and decoder.graphed and decoder.length == 7 + 9
        assert decoder.dtype == torch.bfloat16 == prefetcher.decode_dtype
        assert torch.equal(static_generate(model, x, 9, graphs=False), graphed)
    finally:
        engine.close()
