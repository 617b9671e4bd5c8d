"""One decode step of the hash-function predictor as a fixed-shape program, captured in a CUDA graph.

``HashPredictor.forward`` on one decode token launches dozens of small kernels (LSTM, sparsemax
attention, the causal blocks, the heads, top-k) whose launch cost is host time, milliseconds per
token spent on a thread that shares the GIL with the model's decode. ``GraphedDecoder``
keeps the predictor's causal state in static buffers of a fixed capacity (``max_len`` tokens) and
writes the step with fixed shapes only -- the new token's keys and values go to a position held in a
device tensor, attention runs over the whole buffer masked to the positions filled so far -- so that
on CUDA the step is captured once and a token costs one ``graph.replay()``. On the CPU the same step
runs eagerly (how the tests check the buffer logic).

Usage: ``load`` the eager state after a prefill (``HashPredictor.forward``), then ``step`` once per
decode token. When ``full``, ``to_state`` hands back an eager ``PredictorState`` to continue with
``HashPredictor.forward`` (or to ``load`` into a decoder of larger capacity).

Capture needs the predictor's parameters to stay where they are: build the decoder after moving
the predictor to its device. Not thread-safe: one thread uses a decoder at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sida_moe.compiling import recompile_room
from sida_moe.predictor.model import _MASKED_SCORE, HashPredictor, PredictorState
from sida_moe.predictor.sparsemax import sparsemax

_WARMUP_STEPS = 2  # eager runs on a side stream before capture (lazy init of cuBLAS handles etc.)


class GraphedDecoder:
    """Static-buffer decode step of a :class:`HashPredictor` for batch ``batch`` and at most
    ``max_len`` tokens of context (prompt included).

    - ``k``: experts per token and layer in the top-k outputs (default: the predictor's top-k).
    - ``use_graph``: capture the step in a CUDA graph; None (default): when the predictor is on a GPU.
      False runs the fixed-shape step eagerly (the CPU path; on a GPU, for debugging).
    """

    def __init__(self, predictor: HashPredictor, batch: int, max_len: int = 2048, k: int | None = None,
                 use_graph: bool | None = None) -> None:
        reason = self.unsupported(predictor)
        if reason is not None:
            raise ValueError(f"GraphedDecoder cannot run this predictor: {reason}")
        cfg = predictor.config
        if int(batch) < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        if int(max_len) < 1:
            raise ValueError(f"max_len must be a positive int (tokens of context), got {max_len!r}")
        k = cfg.top_k if k is None else int(k)
        if not 0 < k <= cfg.num_experts:
            raise ValueError(f"k must be in [1, {cfg.num_experts}], got {k}")
        self.predictor = predictor
        self.batch, self.max_len, self.k = int(batch), int(max_len), k
        weight = predictor.compress.weight
        self.device, self.dtype = weight.device, weight.dtype
        if use_graph and self.device.type != "cuda":
            raise ValueError(f"use_graph=True needs the predictor on a CUDA device, it is on {self.device}")
        self.use_graph = self.device.type == "cuda" if use_graph is None else bool(use_graph)
        self._weight_ptr = weight.data_ptr()
        lstm = predictor.lstm
        # PyTorch's parameter names; gate order i, f, g, o
        self._lstm_weights = [
            (getattr(lstm, f"weight_ih_l{n}"), getattr(lstm, f"weight_hh_l{n}"),
             getattr(lstm, f"bias_ih_l{n}") if lstm.bias else None, getattr(lstm, f"bias_hh_l{n}") if lstm.bias else None)
            for n in range(lstm.num_layers)
        ]
        B, H, L, E = self.batch, cfg.hidden, cfg.num_moe_layers, cfg.num_experts
        opts = dict(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            # zeros, not empty: masked positions get weight 0, and 0 * NaN from stale memory would be NaN
            self._x = torch.zeros(B, 1, cfg.input_dim, **opts)
            self._x_in = torch.zeros(B, 1, cfg.input_dim, **opts)
            self._h = torch.zeros(cfg.lstm_layers, B, H, **opts)
            self._c = torch.zeros(cfg.lstm_layers, B, H, **opts)
            self._keys = torch.zeros(B, self.max_len, H, **opts)
            self._values = torch.zeros(B, self.max_len, H, **opts)
            self._valid = torch.zeros(B, self.max_len, dtype=torch.bool, device=self.device)
            self._block_kv = []
            for block in predictor.blocks:
                shape = (B, block.heads, self.max_len, H // block.heads)
                self._block_kv.append((torch.zeros(shape, **opts), torch.zeros(shape, **opts)))
            self._pos = torch.zeros(1, dtype=torch.long, device=self.device)  # the next token's position
            self._logits = torch.zeros(L, B, 1, E, **opts)
            self._topk_values = torch.zeros(L, B, 1, k, **opts)
            self._topk_ids = torch.zeros(L, B, 1, k, dtype=torch.long, device=self.device)
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # the step captured, by compiled or not
        self._compiled = None  # _step under torch.compile (_compiled_step)
        self._length = 0  # host mirror of _pos: no sync to know when the buffers are full
        self._masked = False  # the loaded state had a key mask (to_state gives it back)
        self._loaded = False

    @staticmethod
    def unsupported(predictor: HashPredictor) -> str | None:
        """Why ``predictor`` cannot be run by a decoder (None: it can). The step re-implements
        ``HashPredictor.features``/``head_logits``, so a subclass overriding them is refused."""
        if not isinstance(predictor, HashPredictor):
            return f"expected a HashPredictor, got {type(predictor).__name__}"
        cls = type(predictor)
        for name in ("forward", "features", "head_logits"):
            if getattr(cls, name) is not getattr(HashPredictor, name):
                return (f"{cls.__name__} overrides HashPredictor.{name}; the graphed step re-implements the base "
                        "network and would ignore it (use the eager forward)")
        lstm = predictor.lstm
        if lstm.bidirectional or lstm.proj_size or not lstm.batch_first:
            return "only the predictor's own unidirectional, batch-first LSTM without projection is supported"
        return None

    # ------------------------------------------------------------------------------ state
    @property
    def length(self) -> int:
        """Tokens of context in the buffers (the next token's position)."""
        return self._length

    @property
    def remaining(self) -> int:
        """Decode steps left before the buffers are full."""
        return self.max_len - self._length

    @property
    def full(self) -> bool:
        return self._length >= self.max_len

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def graphed(self) -> bool:
        """True once the step is captured in a CUDA graph."""
        return bool(self._graphs)

    def load(self, state: PredictorState) -> bool:
        """Copy an eager state (e.g. after a prefill by ``HashPredictor.forward``) into the buffers.

        Returns False, and leaves the decoder unloaded, when the state leaves no room for a decode
        token (``state.length >= max_len``); raises ValueError when it is not this decoder's shape."""
        self._loaded = False
        cfg = self.predictor.config
        B, H = self.batch, cfg.hidden
        if state.keys.dim() != 3 or state.keys.shape[0] != B or state.keys.shape[2] != H:
            raise ValueError(f"state keys must be [{B}, length, {H}] for this decoder (batch {B}), "
                             f"got {list(state.keys.shape)}")
        want = (cfg.lstm_layers, B, H)
        if any(tuple(t.shape) != want for t in state.lstm):
            raise ValueError(f"state LSTM (h, c) must each be {list(want)}, got {[list(t.shape) for t in state.lstm]}")
        if len(state.blocks) != len(self._block_kv):
            raise ValueError(f"state has {len(state.blocks)} blocks' keys/values, the predictor has {len(self._block_kv)} blocks")
        P = state.length
        if state.key_mask is not None and tuple(state.key_mask.shape) != (B, P):
            raise ValueError(f"state key_mask must be [{B}, {P}], got {list(state.key_mask.shape)}")
        if P >= self.max_len:
            return False
        if self.use_graph and not self._graphs:
            self.capture()  # first use; the warm-up scribbles on the buffers, so before the copy
        with torch.inference_mode():
            self._h.copy_(state.lstm[0])
            self._c.copy_(state.lstm[1])
            for buf, src in [(self._keys, state.keys), (self._values, state.values)]:
                buf[:, :P].copy_(src)
                buf[:, P:].zero_()
            if state.key_mask is None:
                self._valid[:, :P].fill_(True)
            else:
                self._valid[:, :P].copy_(state.key_mask)
            self._valid[:, P:].fill_(False)
            for (bk, bv), (sk, sv) in zip(self._block_kv, state.blocks):
                for buf, src in [(bk, sk), (bv, sv)]:
                    buf[:, :, :P].copy_(src)
                    buf[:, :, P:].zero_()
            self._pos.fill_(P)
        self._length = P
        self._masked = state.key_mask is not None
        self._loaded = True
        return True

    def to_state(self, dtype: torch.dtype | None = None) -> PredictorState:
        """The buffers' state as an eager ``PredictorState`` (copies; in ``dtype``, default the
        decoder's), to continue with ``HashPredictor.forward`` -- e.g. once ``full``."""
        if not self._loaded:
            raise RuntimeError("GraphedDecoder.to_state() before load(): there is no state")
        P = self._length
        dtype = self.dtype if dtype is None else dtype

        def copy(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype=dtype, copy=True)

        with torch.no_grad():  # not inference mode: normal tensors, usable wherever a forward's state is
            return PredictorState(
                (copy(self._h), copy(self._c)),
                copy(self._keys[:, :P]),
                copy(self._values[:, :P]),
                self._valid[:, :P].clone() if self._masked else None,
                [(copy(bk[:, :, :P]), copy(bv[:, :, :P])) for bk, bv in self._block_kv],
            )

    # ------------------------------------------------------------------------------- step
    def step(self, embeds: torch.Tensor, compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode token: ``embeds [B, 1, input_dim]``. Returns the logits ``[L, B, 1, E]`` and
        top-k ids ``[L, B, 1, k]``: static buffers, overwritten by the next step (clone to keep).
        Equals ``HashPredictor.forward(embeds, state)`` on the loaded state (``compiled``: up to
        the rounding of fused kernels).

        ``compiled=True`` runs the step through ``torch.compile`` (inductor fuses its ~45 small
        kernels), run as is rather than replayed from the decoder's own graph (``capture(True)``
        and :meth:`replay` replay it). The first compiled step compiles (seconds)."""
        if not self._loaded:
            raise RuntimeError("GraphedDecoder.step() before load(): load a prefill's PredictorState first")
        if self.full:
            raise RuntimeError(f"GraphedDecoder is full ({self.max_len} tokens): continue from to_state() with "
                               "HashPredictor.forward, or load it into a decoder with a larger max_len")
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("GraphedDecoder.step() inside a CUDA graph capture: capture(compiled) the step "
                               "once, then set_inputs() and replay() it where it should run")
        with torch.inference_mode():
            self.set_inputs(embeds)
            if compiled:
                self._compiled_step()()
            elif self.use_graph:
                self.capture()  # first use only
                self._graphs[False].replay()
            else:
                self._step()
        self._length += 1
        return self._logits, self._topk_ids

    def set_inputs(self, embeds: torch.Tensor) -> None:
        """Write the next step's input (``step``'s ``embeds``, checked the same way) into the
        step's input buffer, on the current stream; :meth:`replay` then runs the step on it."""
        cfg = self.predictor.config
        want = (self.batch, 1, cfg.input_dim)
        if tuple(embeds.shape) != want:
            raise ValueError(f"embeds must be {list(want)} (batch {self.batch}, one decode token), got {list(embeds.shape)}")
        weight = self.predictor.compress.weight
        if weight.device != self.device or (self._graphs and weight.data_ptr() != self._weight_ptr):
            raise RuntimeError("the predictor's parameters moved since this decoder was built; build a new GraphedDecoder")
        with torch.inference_mode():
            self._x_in.copy_(embeds)

    def replay(self, compiled: bool = False) -> None:
        """One decode step on the inputs :meth:`set_inputs` wrote, replayed on the current stream
        from the step's graph (``compiled``: of the compiled step), which :meth:`capture` must
        have made. Outputs as :meth:`step`'s (``logits``, ``topk_ids``)."""
        graph = self._graphs.get(bool(compiled))
        if graph is None:
            raise RuntimeError(f"GraphedDecoder.replay(compiled={bool(compiled)}) before capture(compiled={bool(compiled)})")
        if not self._loaded or self.full:
            raise RuntimeError("GraphedDecoder.replay() on an unloaded or full decoder")
        graph.replay()
        self._length += 1

    @property
    def logits(self) -> torch.Tensor:
        """The last step's logits ``[L, B, 1, E]`` (static, like ``step``'s outputs)."""
        return self._logits

    @property
    def topk_ids(self) -> torch.Tensor:
        """The last step's top-k ids ``[L, B, 1, k]`` (static, like ``step``'s outputs)."""
        return self._topk_ids

    @property
    def topk_values(self) -> torch.Tensor:
        """The last step's top-k logits ``[L, B, 1, k]`` (static, like ``step``'s outputs)."""
        return self._topk_values

    def capture(self, compiled: bool = False) -> None:
        """Capture the step in a CUDA graph now (``load``/``step`` do it on first use; ``compiled``:
        the compiled step, for :meth:`replay`, compiled first if it was not). A loaded state is kept.
        Capture mode ``thread_local``: other threads may keep using the GPU, but none may
        synchronize the whole device (``torch.cuda.synchronize``) meanwhile, so call this from the
        thread that could."""
        compiled = bool(compiled)
        if not self.use_graph or compiled in self._graphs:
            return
        run = self._compiled_step() if compiled else self._step
        saved = self.to_state() if self._loaded else None
        with torch.inference_mode():
            # warm up on a side stream (PyTorch's CUDA-graph recipe), always writing position 0
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(_WARMUP_STEPS):
                    self._pos.zero_()
                    run()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                run()
        self._graphs[compiled] = graph
        self._weight_ptr = self.predictor.compress.weight.data_ptr()
        self._loaded = False
        if saved is not None:
            self.load(saved)

    def _compiled_step(self):
        """``_step`` under ``torch.compile``, made on first use (one compile per decoder: its
        buffers are the compiled graph's inputs)."""
        if self._compiled is None:
            compiled = torch.compile(self._step, dynamic=False, fullgraph=True)

            def run() -> None:
                with recompile_room():  # decoders of many shapes: each keeps its compiled step
                    compiled()

            self._compiled = run
        return self._compiled

    def _step(self) -> None:
        """The decode step on the static buffers: fixed shapes, no host syncs, no data-dependent
        Python (the same kernels every call, so it can be captured). Mirrors
        ``HashPredictor.features`` + ``head_logits`` for one token."""
        p = self.predictor
        cfg = p.config
        B = self.batch
        self._x.copy_(self._x_in)
        x = self._x
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        inp = torch.relu(p.compress(x))[:, 0]  # [B, hidden]
        for n, (w_ih, w_hh, b_ih, b_hh) in enumerate(self._lstm_weights):
            i, f, g, o = (F.linear(inp, w_ih, b_ih) + F.linear(self._h[n], w_hh, b_hh)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * self._c[n] + torch.sigmoid(i) * torch.tanh(g)
            inp = torch.sigmoid(o) * torch.tanh(c)
            self._c[n].copy_(c)
            self._h[n].copy_(inp)
        h = inp[:, None]  # [B, 1, hidden]

        q, k, v = p.qkv(h).chunk(3, dim=-1)
        self._keys.index_copy_(1, self._pos, k)
        self._values.index_copy_(1, self._pos, v)
        self._valid.index_fill_(1, self._pos, True)
        # positions past this token were never marked valid: the mask covers causality and padding
        scores = torch.matmul(q, self._keys.transpose(1, 2)).float() / math.sqrt(cfg.hidden)  # [B, 1, max_len]
        scores = scores.masked_fill(~self._valid[:, None, :], _MASKED_SCORE)
        attn = sparsemax(scores, dim=-1).to(self._values.dtype)
        feats = h + p.residual(torch.matmul(attn, self._values))

        allowed = self._valid[:, None, None, :]  # [B, 1, 1, max_len], broadcast over heads
        for block, (bk, bv) in zip(p.blocks, self._block_kv):
            dim = feats.shape[-1]
            bq, bkn, bvn = (block.qkv(block.attn_norm(feats)).view(B, 1, 3, block.heads, dim // block.heads)
                            .permute(2, 0, 3, 1, 4))
            bk.index_copy_(2, self._pos, bkn)
            bv.index_copy_(2, self._pos, bvn)
            att = F.scaled_dot_product_attention(bq, bk, bv, attn_mask=allowed)
            feats = feats + block.out(att.transpose(1, 2).reshape(B, 1, dim))
            feats = feats + block.mlp_out(F.gelu(block.mlp_in(block.mlp_norm(feats))))

        self._logits.copy_(p.head_logits(feats))
        values, ids = self._logits.topk(self.k, dim=-1)
        self._topk_values.copy_(values)
        self._topk_ids.copy_(ids)
        self._pos.add_(1)


__all__ = ["GraphedDecoder"]
