"""The run-ahead prefetcher against a real offloaded tiny model (host backend on the CPU)."""

from __future__ import annotations

import pytest
import torch

from sida_moe.offload import engine_of, offload
from sida_moe.predictor import HashPredictor, HashRouting, PredictorConfig, RoutingRecorder, RunAheadPrefetcher, load_prefetcher
from sida_moe.prefetchers import Prefetcher

from test_predictor import tiny_qwen3


def _predictor(conditioned: bool = False, seed: int = 1, attn_blocks: int = 0,
               gate_weights: list[float] | None = None) -> HashPredictor:
    torch.manual_seed(seed)
    return HashPredictor(PredictorConfig(input_dim=32, num_moe_layers=3, num_experts=8, top_k=2, hidden=16,
                                         conditioned=conditioned, attn_blocks=attn_blocks, attn_heads=4,
                                         gate_weights=gate_weights or [])).eval()


def _generate(model, x, n=5, mask=None):
    with torch.no_grad():
        return model.generate(input_ids=x, attention_mask=torch.ones_like(x) if mask is None else mask,
                              max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def _predictions_on_time(model, prefetcher):
    """Hold each forward at its first decoder layer until the run-ahead prediction is ready, so that
    what the tests count does not depend on thread timing (a prediction that arrives after a layer
    ran is, by design, not used for it). Returns the hook handle."""

    def wait(module, args):
        job = prefetcher._current
        if job is not None:
            assert job.ready.wait(10), "the predictor thread never answered"

    # corrections run on the predictor thread: let them land before the next forward makes them stale
    model.register_forward_hook(lambda module, args, out: None if prefetcher.wait_idle(10) else None)
    return model.model.layers[0].register_forward_pre_hook(wait)


def test_is_a_prefetcher():
    assert isinstance(RunAheadPrefetcher(_predictor()), Prefetcher)


@pytest.mark.parametrize("policy,correction", [("lru", "gate"), ("predictive", "refine"), ("predictive", "none"),
                                               ("lru", "fused")])
def test_exact_mode_keeps_outputs_and_prefetches(policy, correction):
    model = tiny_qwen3(seed=2)
    x = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        ref_logits = model(input_ids=x).logits
    ref_tokens = _generate(model, x)
    weights = [0.0, 1.0, 2.0] if correction == "fused" else None
    prefetcher = RunAheadPrefetcher(_predictor(conditioned=correction == "refine", gate_weights=weights),
                                    correction=correction)
    offload(model, gpu_budget=0.5, policy=policy, prefetch=prefetcher)
    engine = engine_of(model)
    _predictions_on_time(model, prefetcher)
    try:
        with torch.no_grad():
            logits = model(input_ids=x).logits
        assert torch.allclose(logits, ref_logits, atol=1e-4)
        assert torch.equal(_generate(model, x), ref_tokens)
        stats = engine.stats()
        m = prefetcher.metrics()
        assert m["forwards"] == 1 + 5  # one full forward, then prefill + 4 decode steps
        assert stats["prefetch_queued"] + stats["prefetch_redundant"] > 0, "the thread queued predicted experts"
        assert 0.0 <= m["hit_rate"] <= 1.0 and m["predictor_ms_per_token"] > 0
        if correction == "none":
            assert m["corrections"] == 0
    finally:
        engine.close()


def _demand_prefetches(correction: str, weights: list[float] | None) -> tuple[list, RunAheadPrefetcher]:
    """The demand-lane prefetches of a 4-token greedy generation, and the prefetcher."""
    model = tiny_qwen3(seed=12)
    prefetcher = RunAheadPrefetcher(_predictor(seed=13, gate_weights=weights), correction=correction)
    offload(model, gpu_budget=0.5, prefetch=prefetcher)
    engine = engine_of(model)
    calls = []
    prefetch = engine.prefetch

    def spy(layer, experts, priority="prefetch", generation=None):
        if priority == "demand":
            calls.append((layer, tuple(experts)))
        return prefetch(layer, experts, priority, generation)

    engine.prefetch = spy
    _predictions_on_time(model, prefetcher)
    try:
        _generate(model, torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(5)), 4)
    finally:
        engine.close()
    return calls, prefetcher


def test_fused_correction_between_prediction_and_gate():
    """Weight 0: the fused prediction is the predictor's, nothing to correct; a huge weight: it is
    the next-layer gate's top-k, the same corrections as correction='gate'."""
    none, p0 = _demand_prefetches("fused", [0.0, 0.0, 0.0])
    assert none == [] and p0.correction == "fused"
    gate, _ = _demand_prefetches("gate", None)
    huge, _ = _demand_prefetches("fused", [0.0, 1e6, 1e6])
    assert gate and huge == gate
    with pytest.raises(ValueError, match="fitted gate_weights"):
        RunAheadPrefetcher(_predictor(), correction="fused")
    assert RunAheadPrefetcher(_predictor()).correction == "gate"  # the default without weights


def test_oracle_predictions_are_all_hits():
    """A predictor that knows the routing predicts exactly the used experts. With hash routing on,
    ``route`` waits for the thread, so every layer is scored, and the oracle's experts and weights
    reproduce the exact model."""
    model = tiny_qwen3(seed=4)
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad(), RoutingRecorder(model) as rec:
        exact = model(input_ids=x).logits
    oracle = torch.stack([rec.layer_logits(l) for l in range(3)]).view(3, 1, 8, 8)

    class Oracle(HashPredictor):
        def forward(self, embeds, state=None, attention_mask=None):
            return oracle.clone(), state

    prefetcher = RunAheadPrefetcher(Oracle(_predictor().config), correction="none", hash_routing=True)
    offload(model, gpu_budget=1.0, policy="lru", prefetch=prefetcher)
    engine = engine_of(model)
    try:
        with torch.no_grad():
            assert torch.allclose(model(input_ids=x).logits, exact, atol=1e-4)
        m = prefetcher.metrics()
        assert (m["hit_rate"], m["precision"], m["late_fraction"]) == (1.0, 1.0, 0.0)
    finally:
        engine.close()


def test_hash_routing_matches_the_hook_version_in_generation():
    """The engine path (route hook, predictor state carried across decode steps in the thread) and the
    plain-model hooks give the same tokens."""
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
    with torch.no_grad():
        with HashRouting(model, pred, "predicted"):
            expected_logits = model(input_ids=x).logits
        with HashRouting(model, pred, "router"):
            expected_router_weighted = model(input_ids=x).logits
        exact_logits = model(input_ids=x).logits
    prefetcher = RunAheadPrefetcher(pred, hash_routing=True)
    offload(model, gpu_budget=0.5, policy="lru", prefetch=prefetcher)
    engine = engine_of(model)
    try:
        with torch.no_grad():
            logits = model(input_ids=x).logits
        assert torch.allclose(logits, expected_logits, atol=1e-4)
        assert not torch.allclose(logits, exact_logits, atol=1e-3), "hash routing must change this model's output"
        assert torch.equal(_generate(model, x, 6), expected)
        assert torch.equal(_generate(model, batch, 6, batch_mask), expected_batch)
        assert not torch.allclose(expected_router_weighted, expected_logits, atol=1e-3)
        engine.set_prefetcher(RunAheadPrefetcher(pred, hash_routing=True, hash_weights="router"))
        with torch.no_grad():
            assert torch.allclose(model(input_ids=x).logits, expected_router_weighted, atol=1e-4)
    finally:
        engine.close()


def test_load_prefetcher_and_size_checks(tmp_path):
    pred = _predictor()
    pred.save(tmp_path)
    prefetcher = load_prefetcher(tmp_path, correction="none")
    assert prefetcher.predictor.config == pred.config
    with pytest.raises(ValueError, match="conditioned=True"):
        RunAheadPrefetcher(pred, correction="refine")
    with pytest.raises(ValueError, match="correction"):
        RunAheadPrefetcher(pred, correction="always")
    with pytest.raises(ValueError, match="k must be"):
        RunAheadPrefetcher(pred, k=9)
    with pytest.raises(ValueError, match="hash_weights"):
        RunAheadPrefetcher(pred, hash_routing=True, hash_weights="mean")
    model = tiny_qwen3(layers=2)
    with pytest.raises(ValueError, match="covers 3 MoE layers"):
        offload(model, gpu_budget=0.5, prefetch=RunAheadPrefetcher(pred))


@pytest.mark.parametrize("attn_blocks", [0, 2])
def test_a_slow_predictor_catches_up_by_coalescing_decode_steps(attn_blocks):
    """When the model outpaces the thread, queued decode tokens are predicted in one call, and the
    predictions are still those of the whole sequence."""
    import time

    calls = []

    class Slow(HashPredictor):
        def forward(self, embeds, state=None, attention_mask=None):
            calls.append(embeds.shape[1])
            time.sleep(0.2)
            return super().forward(embeds, state, attention_mask)

    base = _predictor(seed=7, attn_blocks=attn_blocks)
    slow = Slow(base.config)
    slow.load_state_dict(base.state_dict())
    slow.eval()
    model = tiny_qwen3(seed=8)
    prefetcher = RunAheadPrefetcher(slow, correction="none")
    jobs = []
    begin = prefetcher.begin_forward

    def spy(embeds, mask):
        begin(embeds, mask)
        jobs.append(prefetcher._current)

    prefetcher.begin_forward = spy
    offload(model, gpu_budget=0.5, prefetch=prefetcher)
    engine = engine_of(model)
    try:
        x = torch.randint(0, 64, (1, 6))
        tokens = _generate(model, x, 8)
        for job in jobs:
            assert job.ready.wait(10) and job.error is None
        assert len(jobs) == 8 and len(calls) < 8, f"expected coalesced calls, got token counts {calls}"
        with torch.no_grad():
            # the table, not the module: calling the offloaded model's embedding module starts a forward
            full, _ = base(model.get_input_embeddings().weight[tokens[:, :-1]].float())
        got = torch.cat([job.logits for job in jobs], dim=1)  # [L, T, E] in token order
        assert torch.allclose(got, full[:, 0], atol=1e-5)
        assert prefetcher.metrics()["forwards"] == 8
    finally:
        engine.close()


@pytest.mark.parametrize("attn_blocks", [0, 2])
def test_padded_prompts_are_masked_for_the_predictor(attn_blocks):
    """A left-padded batch: the thread passes the prompt's mask to the predictor, so each row's
    predictions equal those of the row alone with its padding masked."""
    pred = _predictor(seed=9, attn_blocks=attn_blocks)
    model = tiny_qwen3(seed=10)
    x = torch.randint(1, 64, (2, 7))
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    prefetcher = RunAheadPrefetcher(pred, correction="none")
    offload(model, gpu_budget=0.5, prefetch=prefetcher)
    engine = engine_of(model)
    try:
        with torch.no_grad():
            model(input_ids=x, attention_mask=mask)
        job = prefetcher._current
        assert job.ready.wait(10) and job.error is None
        embeds = model.get_input_embeddings().weight[x].float()
        with torch.no_grad():
            expected, _ = pred(embeds, attention_mask=mask)
            unmasked, _ = pred(embeds)
        assert torch.allclose(job.logits, expected.reshape(3, 14, 8), atol=1e-5)
        assert not torch.allclose(job.logits, unmasked.reshape(3, 14, 8), atol=1e-3)
    finally:
        engine.close()


def test_decode_variant_gets_the_previous_tokens_routing():
    """A predictor built with ``prev_token_routing`` gets, for every decode token, the multi-hot of
    the experts each MoE layer really used for the token before it; prompt tokens get zeros."""
    model = tiny_qwen3(seed=5)
    x = torch.randint(0, 64, (1, 6))
    calls: list[tuple[int, torch.Tensor | None]] = []

    class Recording(HashPredictor):
        def forward(self, embeds, state=None, attention_mask=None, prev_token_routing=None):
            calls.append((embeds.shape[1], None if prev_token_routing is None else prev_token_routing.clone()))
            return super().forward(embeds, state, attention_mask, prev_token_routing)

    torch.manual_seed(0)
    cfg = PredictorConfig(input_dim=32, num_moe_layers=3, num_experts=8, top_k=2, hidden=16, prev_token_routing=True)
    prefetcher = RunAheadPrefetcher(Recording(cfg).eval(), correction="none")
    offload(model, gpu_budget=0.5, policy="lru", prefetch=prefetcher)
    engine = engine_of(model)
    routed: list[list[int]] = []  # per (forward, layer): the last token's experts
    after = prefetcher.after_routing

    def spy(moe_layer, hidden, topk_ids):
        routed.append(sorted(topk_ids[-1].tolist()))
        after(moe_layer, hidden, topk_ids)

    prefetcher.after_routing = spy
    try:
        _generate(model, x, n=4)  # prefill + 3 decode forwards
        prefetcher.metrics()  # waits for the newest prediction
    finally:
        engine.close()
    rows = torch.cat([p[0] if p is not None else torch.zeros(n, 3 * 8) for n, p in calls])  # one row per token
    assert rows.shape[0] == 6 + 3
    assert not rows[:6].any(), "prompt tokens: routing not known yet"
    for step in range(3):  # decode token `step` sees the routing of forward `step`'s last token
        want = torch.zeros(3, 8)
        for layer in range(3):
            want[layer, routed[3 * step + layer]] = 1.0
        assert torch.equal(rows[6 + step].view(3, 8), want), step
