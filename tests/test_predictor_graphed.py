"""The predictor's fixed-shape decode step (``GraphedDecoder``) against the eager ``forward``: on the
CPU the step runs eagerly on the static buffers; ``gpu``-marked tests capture it in a CUDA graph."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from sida_moe.offload import engine_of, offload
from sida_moe.predictor import GraphedDecoder, HashPredictor, PredictorConfig, PredictorState, RunAheadPrefetcher

from test_predictor import tiny_qwen3

VARIANTS = [(blocks, head_hidden) for blocks in (0, 2) for head_hidden in (0, 256)]


def _predictor(attn_blocks: int = 0, head_hidden: int = 0, seed: int = 0, device: str = "cpu", **kw) -> HashPredictor:
    torch.manual_seed(seed)
    cfg = PredictorConfig(input_dim=32, num_moe_layers=3, num_experts=8, top_k=2, hidden=32, lstm_layers=2,
                          attn_blocks=attn_blocks, attn_heads=4, head_hidden=head_hidden, **kw)
    return HashPredictor(cfg).to(device).eval()


def _prompt(batch: int, padded: bool, length: int, decode: int, device: str = "cpu", seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, length + decode, 32, generator=g).to(device)
    mask = None
    if padded:
        mask = torch.ones(batch, length, dtype=torch.long, device=device)
        mask[-1, : length // 2] = 0  # the last row is left-padded
    return embeds, mask


def _assert_states_equal(got: PredictorState, want: PredictorState, atol: float) -> None:
    assert got.length == want.length
    for a, b in [*zip(got.lstm, want.lstm), (got.keys, want.keys), (got.values, want.values)]:
        assert torch.allclose(a, b, atol=atol)
    assert (got.key_mask is None) == (want.key_mask is None)
    if want.key_mask is not None:
        assert torch.equal(got.key_mask, want.key_mask)
    for (gk, gv), (wk, wv) in zip(got.blocks, want.blocks, strict=True):
        assert torch.allclose(gk, wk, atol=atol) and torch.allclose(gv, wv, atol=atol)


def _decode_both(pred, decoder, embeds, mask, prompt_len, atol, prev=None):
    """Prefill eagerly, load, then decode every further token eagerly and with the decoder: equal."""
    with torch.inference_mode():
        _, state = pred(embeds[:, :prompt_len], None, mask)
        assert decoder.load(state)
        for t in range(prompt_len, embeds.shape[1]):
            x = embeds[:, t : t + 1]
            p = None if prev is None else prev[:, t : t + 1]
            want, state = pred(x, state, prev_token_routing=p)
            got, ids = decoder.step(x, p)
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=atol), (t, (got - want).abs().max().item())
            # the top-k ids pick the eager top-k logits (ids themselves could differ on exact ties)
            top = want.topk(decoder.k, dim=-1).values
            assert torch.allclose(want.gather(-1, ids), top, atol=atol)
            assert torch.allclose(decoder.topk_values, top, atol=atol)
        assert decoder.length == embeds.shape[1]
        _assert_states_equal(decoder.to_state(), state, atol)
    return state


@pytest.mark.parametrize("attn_blocks,head_hidden", VARIANTS)
@pytest.mark.parametrize("batch,padded", [(1, False), (2, False), (2, True)])
def test_step_equals_eager_forward(attn_blocks, head_hidden, batch, padded):
    pred = _predictor(attn_blocks, head_hidden)
    embeds, mask = _prompt(batch, padded, length=7, decode=30)
    decoder = GraphedDecoder(pred, batch, max_len=48)
    assert not decoder.use_graph and not decoder.graphed  # the CPU: no capture
    _decode_both(pred, decoder, embeds, mask, 7, atol=1e-5)


def test_conditioned_and_prev_token_routing_variants():
    cond = _predictor(2, seed=3, conditioned=True)
    embeds, mask = _prompt(2, True, 6, 12)
    _decode_both(cond, GraphedDecoder(cond, 2, max_len=32), embeds, mask, 6, atol=1e-5)

    pred = _predictor(2, 256, seed=4, prev_token_routing=True)
    hot = (torch.rand(2, 18, 3 * 8, generator=torch.Generator().manual_seed(0)) < 0.25).float()
    decoder = GraphedDecoder(pred, 2, max_len=32)
    _decode_both(pred, decoder, embeds, mask, 6, atol=1e-5, prev=hot)
    # None: unknown routing, zeros (as the eager forward does), also after a step that had some
    with torch.inference_mode():
        _, state = pred(embeds[:, :6], None, mask)
        decoder.load(state)
        decoder.step(embeds[:, 6:7], hot[:, 6:7])
        want, _ = pred(embeds[:, 7:8], decoder.to_state())
        got, _ = decoder.step(embeds[:, 7:8])
    assert torch.allclose(got, want, atol=1e-5)


def test_decode_from_an_empty_state():
    """Loading ``empty_state`` decodes a sequence from its first token, as ``forward`` with no state."""
    pred = _predictor(2, 256, seed=5)
    embeds, _ = _prompt(1, False, 0, 10)
    decoder = GraphedDecoder(pred, 1, max_len=16)
    with torch.inference_mode():
        assert decoder.load(pred.empty_state(1))
        state = None
        for t in range(10):
            want, state = pred(embeds[:, t : t + 1], state)
            got, _ = decoder.step(embeds[:, t : t + 1])
            assert torch.allclose(got, want, atol=1e-5), t


@pytest.mark.parametrize("attn_blocks", [0, 2])
def test_reload_does_not_see_the_previous_sequence(attn_blocks):
    """A long sequence, then a shorter padded one in the same buffers: nothing of the first leaks."""
    pred = _predictor(attn_blocks, seed=6)
    decoder = GraphedDecoder(pred, 2, max_len=40)
    long, _ = _prompt(2, False, 10, 25, seed=2)
    _decode_both(pred, decoder, long, None, 10, atol=1e-5)
    short, mask = _prompt(2, True, 4, 8, seed=3)
    _decode_both(pred, decoder, short, mask, 4, atol=1e-5)


def test_capacity_reached_hands_back_an_eager_state():
    pred = _predictor(2, 256, seed=7)
    embeds, mask = _prompt(2, True, 5, 12, seed=4)  # 17 tokens
    decoder = GraphedDecoder(pred, 2, max_len=9)
    with torch.inference_mode():
        _, state = pred(embeds[:, :5], None, mask)
        _, ref_state = pred(embeds[:, :5], None, mask)
        assert decoder.load(state)
        assert decoder.remaining == 4
        for t in range(5, 9):
            want, ref_state = pred(embeds[:, t : t + 1], ref_state)
            got, _ = decoder.step(embeds[:, t : t + 1])
            assert torch.allclose(got, want, atol=1e-5)
        assert decoder.full and decoder.remaining == 0
        with pytest.raises(RuntimeError, match="full"):
            decoder.step(embeds[:, 9:10])
        handed = decoder.to_state()
        _assert_states_equal(handed, ref_state, 1e-5)
        # continue eagerly from the handed-back state ...
        state = handed
        for t in range(9, 12):
            want, ref_state = pred(embeds[:, t : t + 1], ref_state)
            got, state = pred(embeds[:, t : t + 1], state)
            assert torch.allclose(got, want, atol=1e-5)
        # ... or in a larger decoder
        bigger = GraphedDecoder(pred, 2, max_len=32)
        assert bigger.load(state)
        for t in range(12, 17):
            want, ref_state = pred(embeds[:, t : t + 1], ref_state)
            got, _ = bigger.step(embeds[:, t : t + 1])
            assert torch.allclose(got, want, atol=1e-5)
        # a state that leaves no room is refused, and the decoder stays unusable until a load fits
        assert not decoder.load(ref_state)
        assert not decoder.loaded
        with pytest.raises(RuntimeError, match="before load"):
            decoder.step(embeds[:, :1])


def test_clear_errors():
    pred = _predictor(2)
    decoder = GraphedDecoder(pred, 1, max_len=16)
    with pytest.raises(RuntimeError, match="before load"):
        decoder.step(torch.zeros(1, 1, 32))
    with pytest.raises(RuntimeError, match="before load"):
        decoder.to_state()
    with torch.inference_mode():
        _, state2 = pred(torch.randn(2, 4, 32))
        _, state1 = pred(torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="batch 1"):
        decoder.load(state2)
    with pytest.raises(ValueError, match="blocks"):
        GraphedDecoder(_predictor(0), 1, max_len=16).load(state1)
    assert decoder.load(state1)
    for bad in (torch.zeros(1, 2, 32), torch.zeros(1, 1, 31), torch.zeros(2, 1, 32), torch.zeros(1, 32)):
        with pytest.raises(ValueError, match=r"embeds must be \[1, 1, 32\]"):
            decoder.step(bad)
    with pytest.raises(ValueError, match="without prev_token_routing"):
        decoder.step(torch.zeros(1, 1, 32), torch.zeros(1, 1, 24))
    prev_decoder = GraphedDecoder(_predictor(prev_token_routing=True), 1, max_len=16)
    prev_decoder.load(_predictor(prev_token_routing=True).empty_state(1))
    with pytest.raises(ValueError, match=r"prev_token_routing must be \[1, 1, 24\]"):
        prev_decoder.step(torch.zeros(1, 1, 32), torch.zeros(1, 1, 8))
    for kwargs, match in [({"batch": 0}, "batch"), ({"max_len": 0}, "max_len"), ({"k": 9}, "k must be"),
                          ({"use_graph": True}, "CUDA device")]:
        with pytest.raises(ValueError, match=match):
            GraphedDecoder(pred, **({"batch": 1} | kwargs))

    class Custom(HashPredictor):
        def forward(self, embeds, state=None, attention_mask=None, prev_token_routing=None):
            return super().forward(embeds, state, attention_mask, prev_token_routing)

    custom = Custom(pred.config)
    assert "overrides HashPredictor.forward" in GraphedDecoder.unsupported(custom)
    with pytest.raises(ValueError, match="overrides HashPredictor.forward"):
        GraphedDecoder(custom, 1)
    with pytest.raises(ValueError, match="cuda_graph=True: .*overrides"):
        RunAheadPrefetcher(custom, cuda_graph=True)
    with pytest.raises(ValueError, match="graph_max_len"):
        RunAheadPrefetcher(pred, graph_max_len=0)


# ---------------------------------------------------------------------------- the prefetcher
def _small_predictor(attn_blocks: int, seed: int, **kw) -> HashPredictor:
    torch.manual_seed(seed)
    return HashPredictor(PredictorConfig(input_dim=32, num_moe_layers=3, num_experts=8, top_k=2, hidden=16,
                                         attn_blocks=attn_blocks, attn_heads=4, **kw)).eval()


def _generate(model, x, n, mask=None):
    with torch.no_grad():
        return model.generate(input_ids=x, attention_mask=torch.ones_like(x) if mask is None else mask,
                              max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def _run(prefetcher, seed, x, mask, n, on_time=True, hold=None):
    """Generate ``n`` tokens with ``prefetcher``; returns the jobs (one per forward), the metrics
    and the tokens. ``on_time``: each forward waits for its prediction (deterministic metrics).
    ``hold``: a threading.Event the worker's first prediction waits for (to make it coalesce)."""
    model = tiny_qwen3(seed=seed)
    jobs = []
    begin = prefetcher.begin_forward

    def spy(embeds, m):
        begin(embeds, m)
        jobs.append(prefetcher._current)

    prefetcher.begin_forward = spy
    runs = []
    if hold is not None:
        predict = prefetcher._predict

        def held(run):
            assert hold.wait(10)
            runs.append(len(run))
            predict(run)

        prefetcher._predict = held
    offload(model, gpu_budget=0.5, policy="predictive", prefetch=prefetcher)
    engine = engine_of(model)
    handle = None
    if on_time:
        def wait(module, args):
            if prefetcher._current is not None:
                assert prefetcher._current.ready.wait(10)

        handle = model.model.layers[0].register_forward_pre_hook(wait)
    try:
        tokens = _generate(model, x, n, mask)
        if hold is not None:
            hold.set()
        for job in jobs:
            assert job.ready.wait(10) and job.error is None, job.error
        if hold is not None:
            assert max(runs) > 1, f"expected coalesced decode tokens, got runs of {runs}"
        return jobs, prefetcher.metrics(), tokens, model
    finally:
        if handle is not None:
            handle.remove()
        engine.close()


@pytest.mark.parametrize("attn_blocks,batch", [(0, 1), (2, 1), (2, 2)])
def test_prefetcher_graphed_path_equals_eager(attn_blocks, batch):
    """The fixed-shape step (forced on, the CPU fallback) gives the eager path's predictions, metrics,
    corrections and tokens; only ``graph_steps`` tells them apart."""
    x = torch.randint(1, 64, (batch, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x)
    if batch == 2:
        mask[1, :3] = 0
    pred = _small_predictor(attn_blocks, seed=11, gate_weights=[0.0, 1.0, 2.0])
    runs = {}
    for graph in (False, True):
        prefetcher = RunAheadPrefetcher(pred, correction="fused", cuda_graph=graph, graph_max_len=32)
        runs[graph] = _run(prefetcher, 12, x, mask, n=6)
    (ejobs, em, etok, _), (gjobs, gm, gtok, _) = runs[False], runs[True]
    assert torch.equal(etok, gtok)
    assert len(ejobs) == len(gjobs) == 6
    for e, g in zip(ejobs, gjobs):
        assert torch.allclose(e.logits, g.logits, atol=1e-5)
        assert e.predicted == g.predicted
    assert gm["graph_steps"] == 5 and em["graph_steps"] == 0  # every decode token of the graphed run
    for key in ("hit_rate", "precision", "late_fraction", "corrections", "forwards"):
        assert gm[key] == em[key], key
    assert gm["predictor_ms_per_token"] > 0


def test_prefetcher_graphed_logits_are_copies_and_overflow_continues_eagerly():
    """``job.logits`` of graphed tokens are not aliased by later replays; a sequence outgrowing
    ``graph_max_len`` continues eagerly from the decoder's state, with the same predictions as one
    full-sequence forward; a prompt that does not fit never uses the graph."""
    pred = _small_predictor(2, seed=13, head_hidden=24)
    x = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(4))
    prefetcher = RunAheadPrefetcher(pred, correction="none", cuda_graph=True, graph_max_len=9, inline_decode=False)
    jobs, m, tokens, model = _run(prefetcher, 14, x, None, n=8)
    assert m["graph_steps"] == 3  # positions 6, 7, 8; the rest past capacity
    with torch.no_grad():
        full, _ = pred(model.get_input_embeddings().weight[tokens[:, :-1]].float())
    got = torch.cat([job.logits for job in jobs], dim=1)  # [L, T, E] in token order
    assert torch.allclose(got, full[:, 0], atol=1e-5)

    small = RunAheadPrefetcher(pred, correction="none", cuda_graph=True, graph_max_len=6, inline_decode=False)
    _, m, _, _ = _run(small, 14, x, None, n=4)
    assert m["graph_steps"] == 0 and m["forwards"] == 4


def test_prefetcher_coalesced_decode_tokens_replay_once_each():
    """A worker that fell behind predicts the queued decode tokens in one run: one step per token,
    the predictions still those of the whole sequence."""
    pred = _small_predictor(2, seed=15)
    calls = []

    class Counting(GraphedDecoder):
        def step(self, embeds, prev_token_routing=None):
            calls.append(embeds.shape)
            return super().step(embeds, prev_token_routing)

    import sida_moe.predictor.runahead as runahead

    prefetcher = RunAheadPrefetcher(pred, correction="none", cuda_graph=True, graph_max_len=32, inline_decode=False)
    hold = threading.Event()
    original = runahead.GraphedDecoder
    runahead.GraphedDecoder = Counting
    try:
        x = torch.randint(1, 64, (1, 5), generator=torch.Generator().manual_seed(6))
        jobs, m, tokens, model = _run(prefetcher, 16, x, None, n=7, on_time=False, hold=hold)
    finally:
        runahead.GraphedDecoder = original
    assert len(calls) == 6 and m["graph_steps"] == 6
    with torch.no_grad():
        full, _ = pred(model.get_input_embeddings().weight[tokens[:, :-1]].float())
    assert torch.allclose(torch.cat([job.logits for job in jobs], dim=1), full[:, 0], atol=1e-5)


def test_prefetcher_graphed_hash_routing_and_prev_routing_variant():
    """Hash routing reads ``job.logits`` of graphed tokens: same tokens as the eager path. A
    ``prev_token_routing`` predictor gets the previous token's routing in the graphed step too."""
    x = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(7))
    for pred, kwargs in [(_small_predictor(2, seed=17), {"hash_routing": True, "correction": "none"}),
                         (_small_predictor(0, seed=18, prev_token_routing=True), {"correction": "gate"})]:
        out = {}
        for graph in (False, True):
            prefetcher = RunAheadPrefetcher(pred, cuda_graph=graph, graph_max_len=32, **kwargs)
            out[graph] = _run(prefetcher, 19, x, None, n=5)
        assert torch.equal(out[False][2], out[True][2])
        for e, g in zip(out[False][0], out[True][0]):
            assert torch.allclose(e.logits, g.logits, atol=1e-5)
        assert out[True][1]["graph_steps"] == 4


def test_prefetcher_default_is_eager_on_the_cpu():
    prefetcher = RunAheadPrefetcher(_small_predictor(0, seed=20), correction="none")
    assert prefetcher.cuda_graph is None
    _, m, _, _ = _run(prefetcher, 21, torch.randint(1, 64, (1, 5)), None, n=3)
    assert m["graph_steps"] == 0


# ----------------------------------------------------------------------------------- the GPU
@contextlib.contextmanager
def _full_fp32():
    """Eager cuDNN LSTM and matmuls in full fp32 (no TF32), so the graph's result can be compared
    tightly."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.parametrize("attn_blocks,head_hidden", [(0, 0), (2, 256)])
@pytest.mark.parametrize("batch,padded", [(1, False), (2, True)])
def test_cuda_graph_replay_equals_eager(attn_blocks, head_hidden, batch, padded):
    pred = _predictor(attn_blocks, head_hidden, device="cuda")
    embeds, mask = _prompt(batch, padded, length=9, decode=50, device="cuda")
    decoder = GraphedDecoder(pred, batch, max_len=128)
    assert decoder.use_graph
    with _full_fp32():
        _decode_both(pred, decoder, embeds, mask, 9, atol=1e-4)
        assert decoder.graphed
        # a second sequence in the same graph
        _decode_both(pred, decoder, *_prompt(batch, padded, 5, 20, device="cuda", seed=9), 5, atol=1e-4)


@pytest.mark.gpu
def test_cuda_graph_capture_keeps_a_loaded_state():
    pred = _predictor(2, 256, device="cuda")
    embeds, _ = _prompt(1, False, 6, 10, device="cuda")
    with _full_fp32(), torch.inference_mode():
        decoder = GraphedDecoder(pred, 1, max_len=32)
        _, state = pred(embeds[:, :6])
        decoder.use_graph = False
        assert decoder.load(state)  # loaded without a graph ...
        decoder.use_graph = True
        decoder.capture()  # ... captured afterwards: the state survives the warm-up
        assert decoder.graphed and decoder.length == 6
        for t in range(6, 16):
            want, state = pred(embeds[:, t : t + 1], state)
            got, _ = decoder.step(embeds[:, t : t + 1])
            assert torch.allclose(got, want, atol=1e-4), t


@pytest.mark.gpu
def test_prefetcher_on_cuda_uses_the_graph():
    pred = _small_predictor(2, seed=22, head_hidden=24)
    model = tiny_qwen3(seed=23).half().cuda()
    prefetcher = RunAheadPrefetcher(pred, correction="gate")
    assert prefetcher.cuda_graph is None
    jobs = []
    begin = prefetcher.begin_forward

    def spy(embeds, m):
        begin(embeds, m)
        jobs.append(prefetcher._current)

    prefetcher.begin_forward = spy
    offload(model, gpu_budget=0.5, policy="predictive", prefetch=prefetcher)
    engine = engine_of(model)

    def wait(module, args):
        if prefetcher._current is not None:
            assert prefetcher._current.ready.wait(10)

    model.model.layers[0].register_forward_pre_hook(wait)
    x = torch.randint(1, 64, (1, 7), device="cuda")
    try:
        with _full_fp32():
            tokens = _generate(model, x, 9)
            m = prefetcher.metrics()
            for job in jobs:
                assert job.ready.wait(10) and job.error is None, job.error
            assert m["graph_steps"] == 8 and m["forwards"] == 9
            assert prefetcher._decoders[1].graphed
            with torch.no_grad():
                full, _ = pred(model.get_input_embeddings().weight[tokens[:, :-1]].float())
            got = torch.cat([job.logits for job in jobs], dim=1)
            assert got.device.type == "cuda"
            assert torch.allclose(got, full[:, 0], atol=1e-4)
            assert 0.0 <= m["hit_rate"] <= 1.0 and m["predictor_ms_per_token"] > 0
    finally:
        engine.close()
