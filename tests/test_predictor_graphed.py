"""The predictor's fixed-shape decode step (``GraphedDecoder``) against the eager ``forward``: on the
CPU the step runs eagerly on the static buffers; ``gpu``-marked tests capture it in a CUDA graph."""

from __future__ import annotations

import contextlib

import pytest
import torch

from sida_moe.predictor import GraphedDecoder, HashPredictor, PredictorConfig, PredictorState, SidaPrefetcher

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


def _decode_both(pred, decoder, embeds, mask, prompt_len, atol, compiled=False):
    """Prefill eagerly, load, then decode every further token eagerly and with the decoder: equal."""
    with torch.inference_mode():
        _, state = pred(embeds[:, :prompt_len], None, mask)
        assert decoder.load(state)
        for t in range(prompt_len, embeds.shape[1]):
            x = embeds[:, t : t + 1]
            want, state = pred(x, state)
            got, ids = decoder.step(x, compiled=compiled)
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


def test_compiled_step_equals_eager_forward():
    """``compiled=True``: the same step through torch.compile (fused kernels), the same state."""
    torch._dynamo.reset()
    pred = _predictor(2, 256, seed=6)
    embeds, mask = _prompt(2, True, length=5, decode=6)
    decoder = GraphedDecoder(pred, 2, max_len=16)
    _decode_both(pred, decoder, embeds, mask, 5, atol=1e-4, compiled=True)
    # a new sequence in the same buffers reuses the compiled step
    _decode_both(pred, decoder, *_prompt(2, False, 3, 4, seed=2), 3, atol=1e-4, compiled=True)


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
    for kwargs, match in [({"batch": 0}, "batch"), ({"max_len": 0}, "max_len"), ({"k": 9}, "k must be"),
                          ({"use_graph": True}, "CUDA device")]:
        with pytest.raises(ValueError, match=match):
            GraphedDecoder(pred, **({"batch": 1} | kwargs))

    class Custom(HashPredictor):
        def forward(self, embeds, state=None, attention_mask=None):
            return super().forward(embeds, state, attention_mask)

    custom = Custom(pred.config)
    assert "overrides HashPredictor.forward" in GraphedDecoder.unsupported(custom)
    with pytest.raises(ValueError, match="overrides HashPredictor.forward"):
        GraphedDecoder(custom, 1)
    with pytest.raises(ValueError, match="cannot be served: .*overrides"):
        SidaPrefetcher(custom)  # the prefetcher decodes through the decoder only


def test_replay_needs_a_captured_step_and_room_and_set_inputs_checks_its_inputs():
    """``replay`` runs only a step ``capture`` made (there is none on the CPU), and ``set_inputs``
    refuses what ``step`` refuses."""
    pred = _predictor(2, seed=8)
    decoder = GraphedDecoder(pred, 1, max_len=6)
    embeds, _ = _prompt(1, False, 3, 3, seed=5)
    with torch.inference_mode():
        _, state = pred(embeds[:, :3])
        assert decoder.load(state)
        with pytest.raises(RuntimeError, match=r"replay\(compiled=False\) before capture"):
            decoder.replay()
        with pytest.raises(ValueError, match="embeds must be"):
            decoder.set_inputs(embeds[:, :2])
        decoder.set_inputs(embeds[:, 3:4])
        assert decoder.length == 3  # inputs only: no step ran


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
@pytest.mark.parametrize("compiled", [False, True])
def test_replays_of_the_captured_step_on_a_side_stream_equal_the_eager_forward(compiled):
    """The greedy loop's use (``SideStep``): inputs written and the step replayed on another
    stream, token after token; each equals the eager forward, ``length`` counts the replays, and a
    step called inside someone else's capture is refused."""
    if compiled:
        torch._dynamo.reset()
    pred = _predictor(2, 256, device="cuda")
    embeds, _ = _prompt(1, False, 6, 6, device="cuda")
    side = torch.cuda.Stream()
    with _full_fp32(), torch.inference_mode():
        decoder = GraphedDecoder(pred, 1, max_len=32)
        _, state = pred(embeds[:, :6])
        assert decoder.load(state)
        if compiled:
            want, state = pred(embeds[:, 6:7], state)
            got, _ = decoder.step(embeds[:, 6:7], compiled=True)  # compiles, outside any capture
            assert torch.allclose(got, want, atol=1e-4)
        start = decoder.length
        decoder.capture(compiled)
        assert decoder.length == start  # capturing keeps the loaded state
        for t in range(start, 12):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                decoder.set_inputs(embeds[:, t : t + 1])
                decoder.replay(compiled)
            torch.cuda.current_stream().wait_stream(side)
            want, state = pred(embeds[:, t : t + 1], state)
            assert torch.allclose(decoder.logits, want, atol=1e-4), t
        assert decoder.length == 12
        _assert_states_equal(decoder.to_state(), state, 1e-4)
        outer = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
            with torch.cuda.graph(outer):
                decoder.step(embeds[:, 12:13])
