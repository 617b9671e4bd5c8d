"""The run-ahead prefetcher: SiDA's hash-building thread, as a ``sida_moe.prefetchers.Prefetcher``.

Per model forward (``begin_forward``) the layer-0 input is handed to a background thread that runs
the hash function on it (carrying the predictor's causal state across decode steps), then streams
prefetches of every MoE layer's predicted experts in layer order, tagged with the forward's
generation so that a newer forward cancels them, and feeds the predicted acquire sequence to the
predictive eviction policy (``set_future``). The inference thread never waits for it in exact mode.

As true routing appears (``after_routing`` of layer l), the next layer's prefetch is corrected. The
inference thread only copies layer l's hidden state and records an event; the predictor thread
computes the correction on its own stream and queues the copies (measured on the H100: computed on
the inference thread, the correction's per-layer host sync cost 8-15% of decode tokens/s). A
correction whose forward is over by the time the thread reaches it is dropped.
``correction="lookahead"`` (the default for a predictor with trained lookahead heads) runs layer
l+1's head on layer l's hidden state and the forward's prediction (two small matmuls on the compute
stream) and queues its top-k that was not predicted on the demand lane. Previous-token heads also
read the previous token's router input of layer L-2, which the inference thread keeps from the
previous forward, and correct layer 0 too: the thread applies layer 0's head (on the token's
embedding) before it queues the forward's prefetches; ``"fused"`` (the default for a predictor with fitted ``gate_weights``) applies layer
l+1's router to layer l's hidden state (one small matmul on the compute stream), adds its logits to
the predictor's by the fitted weight, and queues the fused top-k that was not predicted on the
demand lane; ``"gate"`` (the default otherwise) queues the router's own top-k instead;
``"refine"`` uses the conditioned predictor's ``refine`` with layer l's true routing; ``"none"``
keeps the embedding-only prediction.

Hash routing (``hash_routing=True``, opt-in, lossy): ``route`` waits for the forward's prediction
and returns the predicted experts instead of the router's, weighted by the predictor's softmax
(``hash_weights="predicted"``, the paper's mode) or by the router's softmax at those experts
(``"router"``: one extra router matmul, far closer to exact -- see NOTES.md).

CUDA graphs (``cuda_graph``, on by default when the predictor runs on a GPU): a decode token's
predictor step is dozens of small kernel launches (about 3.2 ms of host time per token for the
reference predictor on the H100), and that host time, spent under the GIL, slowed the model's own
decode by ~15%. The prompt still runs through the eager ``HashPredictor.forward``; its state is then
loaded into a :class:`~sida_moe.predictor.graphed.GraphedDecoder` (static buffers of
``graph_max_len`` tokens, one per batch size, captured on the inference thread at the first prompt of
that batch size) and every decode token is one ``graph.replay()``; the top-k ids reach the host
through pinned memory and an event wait that releases the GIL. A sequence longer than
``graph_max_len`` continues on the eager path from the decoder's state.

Inline decode (``inline_decode``, on whenever it applies): with graphs, a decode token's prediction
is a handful of launches, so the inference thread issues them itself instead of handing the token
to the thread. ``begin_forward`` runs the decoder's graph on a side stream (layer 0's
previous-token head included) and defers its top-k to the engine: a native thread waits for the
ids (no GIL held), feeds the predictive policy and queues the prefetches of the layers not yet
routed. ``after_routing`` of layer l runs layer l+1's lookahead head
(:class:`~sida_moe.predictor.graphed.GraphedLookahead`) on the same stream and defers its top-k the
same way, minus the prediction, on the demand lane (the last layer's also keeps layer L-2's router
input as the next token's previous-token state). On CUDA each of these is one native call,
``SlotCache.run_program`` on the graphs registered with ``register_program``: the input copied on
the compute stream (after the previous launch finished reading it), an event, the graph launch on
the side stream, the asynchronous copy of the ids to pinned memory. On the CPU (tests) the same
steps run eagerly in Python, with ``OffloadEngine.prefetch_deferred``. The compute stream never
waits for the side stream, and no Python thread competes for the GIL per token: measured on the
H100, the thread's per-token Python (graph replay, top-k to the host, per-layer sets and calls,
corrections) cost about a third of the decode tokens/s of this host-bound model (NOTES.md,
sessions 7-8). The prompt is still predicted on the thread, which loads the decoder; the first
decode token then takes it over. ``predictor_ms_per_token`` then counts the inference thread's host
time for the predictor.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from sida_moe.predictor.graphed import GraphedDecoder, GraphedLookahead
from sida_moe.predictor.hash_routing import WeightSource, hash_route, router_normalizes
from sida_moe.predictor.model import HashPredictor, PredictorState, routing_multi_hot

if TYPE_CHECKING:
    from sida_moe.engine import OffloadEngine

Correction = Literal["lookahead", "fused", "gate", "refine", "none"]
_MAX_GRAPHED_BATCHES = 4  # batch sizes with their own captured decoder; others decode eagerly


@dataclass
class _Job:
    generation: int
    embeds: torch.Tensor  # [B, S, H] on the predictor's device (or pinned host memory being filled)
    mask: torch.Tensor | None  # [B, S] attention mask of these tokens (prefill with padding), or None
    copied: torch.cuda.Event | None  # recorded after the copy into ``embeds`` (None: ready now)
    fresh: bool  # a new sequence: reset the predictor state
    tokens: int
    layers_done: int = 0  # MoE layers of this forward already routed (written by the inference thread)
    ready: threading.Event = field(default_factory=threading.Event)
    predicted: list[set[int]] = field(default_factory=list)  # per MoE layer: predicted experts
    logits: torch.Tensor | None = None  # [L, T, E], kept for refine / hash routing
    error: BaseException | None = None
    # [B, S, L*E] previous token's true routing (decode variant, on the predictor's device), or None
    prev_routing: torch.Tensor | None = None
    # [B, d] previous token's layer L-2 router input (previous-token lookahead heads, decode), or None
    previous: torch.Tensor | None = None
    inline: bool = False  # predicted on the inference thread (module docstring, "Inline decode")
    # inline on CUDA: native program ids (decoder, {layer: lookahead}) its corrections run, or None
    programs: tuple[int, dict[int, int]] | None = None


@dataclass
class _Correction:
    """Layer ``layer`` of ``job`` was routed: correct layer ``layer + 1``'s prefetches (worker thread)."""

    job: _Job
    layer: int
    hidden: torch.Tensor  # [T, d] copy of layer ``layer``'s router input, on the model's device
    topk_ids: torch.Tensor  # [T, k] copy of its true experts
    written: torch.cuda.Event | None  # recorded after the copies (None: on the CPU, ready now)


class RunAheadPrefetcher:
    """SiDA's predictor as a prefetcher (see the module docstring).

    - ``predictor``: a trained :class:`HashPredictor` matching the model's MoE layers and experts.
    - ``device``: where the predictor runs; None (default): the model's device, on its own stream
      (measured best on the H100: higher hit rate and fewer late predictions than on the CPU).
      ``"cpu"`` keeps the GPU free; the embeddings then reach it by an asynchronous copy.
    - ``k``: experts prefetched per token and layer (default: the model's top-k).
    - ``feed_future``: send the predicted acquire sequence to ``set_future`` (predictive policy).
    - ``hash_routing`` / ``hash_weights``: the opt-in lossy mode (module docstring).
    - ``cuda_graph``: decode tokens through a captured :class:`GraphedDecoder` (module docstring);
      None (default): when the predictor runs on a GPU and is a plain :class:`HashPredictor`. True on
      the CPU runs the same fixed-shape step eagerly. ``graph_max_len``: its capacity in tokens.
    - ``inline_decode``: predict decode tokens on the inference thread (module docstring, "Inline
      decode"); None (default): whenever it applies (graphs on, the predictor on the model's
      device, correction ``"lookahead"`` or ``"none"``, no hash routing, not the decode variant);
      True raises at ``attach`` when it does not apply; False keeps every token on the thread.
    """

    name = "sida"
    # predicts and corrects through acquire calls; decode keeps the acquire path until its
    # prediction runs inside the decode step (once prediction runs inside the captured step)
    table_decode = False

    def __init__(
        self,
        predictor: HashPredictor,
        device: str | torch.device | None = None,
        correction: Correction | None = None,
        k: int | None = None,
        feed_future: bool = True,
        hash_routing: bool = False,
        hash_weights: WeightSource = "predicted",
        cuda_graph: bool | None = None,
        graph_max_len: int = 2048,
        inline_decode: bool | None = None,
    ) -> None:
        if cuda_graph:
            reason = GraphedDecoder.unsupported(predictor)
            if reason is not None:
                raise ValueError(f"cuda_graph=True: {reason}")
        if int(graph_max_len) < 1:
            raise ValueError(f"graph_max_len must be a positive int (tokens), got {graph_max_len!r}")
        if hash_weights not in ("predicted", "router"):
            raise ValueError(f"hash_weights must be 'predicted' or 'router', got {hash_weights!r}")
        if correction is None:
            correction = ("lookahead" if predictor.lookahead is not None
                          else "fused" if predictor.config.gate_weights else "gate")
        if correction not in ("lookahead", "fused", "gate", "refine", "none"):
            raise ValueError(f"correction must be 'lookahead', 'fused', 'gate', 'refine' or 'none', got {correction!r}")
        if correction == "lookahead" and predictor.lookahead is None:
            raise ValueError("correction='lookahead' needs a predictor with trained lookahead heads "
                             "(sida_moe.predictor.lookahead.train_lookahead)")
        if correction == "refine" and predictor.prev_routing is None:
            raise ValueError("correction='refine' needs a predictor trained with conditioned=True")
        if correction == "fused" and not predictor.config.gate_weights:
            raise ValueError("correction='fused' needs a predictor with fitted gate_weights "
                             "(train it on a trace recorded with the next-layer gate)")
        if k is not None and not 0 < k <= predictor.config.num_experts:
            raise ValueError(f"k must be in [1, {predictor.config.num_experts}], got {k}")
        self.predictor = predictor.eval()
        self.device: torch.device | None = None
        self._requested_device = device
        self.correction = correction
        self.k = k or predictor.config.top_k
        self.feed_future = feed_future
        self.hash_routing = hash_routing
        self.hash_weights = hash_weights
        self.cuda_graph = cuda_graph
        self.graph_max_len = int(graph_max_len)
        self.inline_decode = inline_decode
        self._inline_ok = False  # resolved at attach
        self._inline: GraphedDecoder | None = None  # the sequence's decoder while decoding inline (inference thread)
        self._lookaheads: dict[int, GraphedLookahead] = {}  # per batch size, beside its decoder
        self._inline_stream: torch.cuda.Stream | None = None  # the inline programs' stream (GPU)
        # per batch size: native program ids (decoder, {layer: lookahead}) in _program_cache
        self._programs: dict[int, tuple[int, dict[int, int]]] = {}
        self._program_cache = None  # the engine's SlotCache they are registered with
        self._all_layers = list(range(predictor.config.num_moe_layers))
        self._ready = threading.Event()  # shared by inline jobs: ready when created, no Event per token
        self._ready.set()
        self._use_graphs = False  # resolved with the device (_set_device)
        self._decoders: dict[int, GraphedDecoder] = {}  # per batch size; created on the inference thread
        self._live: GraphedDecoder | None = None  # holds the current sequence's state (worker thread)
        self._engine: OffloadEngine | None = None
        self._queue: queue.Queue[_Job | _Correction | None] = queue.Queue()
        self._outstanding = 0  # items queued and not yet done (wait_idle)
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self._state: PredictorState | None = None  # owned by the worker thread
        self._seen_tokens = 0  # tokens of the current sequence given to the predictor (inference thread)
        self._current: _Job | None = None
        # decode variant: per MoE layer, [B, k] experts of each row's last routed token (inference thread)
        self._last_routing: list[torch.Tensor | None] = [None] * predictor.config.num_moe_layers
        # previous-token heads: [B, d] each row's last token's layer L-2 router input (inference thread)
        self._reads_previous = correction == "lookahead" and predictor.lookahead.previous_token
        self._last_state: torch.Tensor | None = None
        self._copy_stream: torch.cuda.Stream | None = None
        self._lock = threading.Lock()
        self.reset_metrics()
        if device is not None:
            self._set_device(torch.device(device))

    # ------------------------------------------------------------------------------ protocol
    def attach(self, engine: OffloadEngine) -> None:
        layers = engine.moe_layers
        cfg = self.predictor.config
        if len(layers) != cfg.num_moe_layers:
            raise ValueError(f"the predictor covers {cfg.num_moe_layers} MoE layers, the model has {len(layers)}")
        if any(layer.num_experts != cfg.num_experts for layer in layers):
            raise ValueError(f"the predictor predicts {cfg.num_experts} experts per layer, the model has "
                             f"{sorted({layer.num_experts for layer in layers})}")
        if len({layer.stack for layer in layers}) > 1:
            raise ValueError("the run-ahead prefetcher serves decoder-only models (one stack of MoE layers)")
        if self._requested_device is None:
            self._set_device(torch.device(engine.device))
        self._engine = engine
        self._seen_tokens = 0
        self._current = None
        self._inline = None
        self._last_routing = [None] * cfg.num_moe_layers
        self._last_state = None
        reason = self._inline_unsupported(engine)
        if self.inline_decode and reason is not None:
            raise ValueError(f"inline_decode=True: {reason}")
        self._inline_ok = self.inline_decode is not False and reason is None
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._worker, name="sida-predictor", daemon=True)
            self._thread.start()

    def begin_forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        engine = self._require_engine()
        x = inputs_embeds if inputs_embeds.dim() == 3 else inputs_embeds.unsqueeze(0)
        seq = x.shape[1]
        total = attention_mask.shape[-1] if attention_mask is not None else None
        # A fresh sequence unless this forward continues the tokens already predicted (cached decode:
        # one new token, and a mask -- when given -- one longer than the tokens seen so far).
        fresh = seq > 1 or self._current is None or (total is not None and total != self._seen_tokens + seq)
        if self._current is not None and self._current.embeds.shape[0] != x.shape[0]:
            fresh = True
        self._seen_tokens = (0 if fresh else self._seen_tokens) + seq
        if not fresh and seq == 1 and self._inline_ok and self._begin_inline(x.detach()):
            return
        if self._inline is not None:
            self._leave_inline(fresh)
        if fresh and self._use_graphs and seq < self.graph_max_len:
            self._decoder_for(x.shape[0], x.dtype)  # captured here, before the worker needs it
        # the prompt's padding must not be attended to; decode tokens are real tokens
        mask = attention_mask[..., -seq:] if attention_mask is not None and seq > 1 else None
        # decode variant: the previous token's routing, complete since the previous forward ended
        prev = self._previous_token_routing(x.shape[0]) if not fresh and seq == 1 else None
        # previous-token heads: the last token's state, complete since the previous forward ended
        state = self._last_state
        if fresh or seq != 1 or state is None or state.shape[0] != x.shape[0]:
            state = None
        self._last_state = None  # this forward's layer L-2 sets it again
        (embeds, mask, prev, state), copied = self._to_predictor_device(x.detach(), mask, prev, state)
        job = _Job(engine.generation, embeds, mask, copied, fresh, x.shape[0] * seq, prev_routing=prev,
                   previous=state)
        self._current = job
        self._put(job)

    def after_routing(self, moe_layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor) -> None:
        engine = self._require_engine()
        job = self._current
        if job is None:
            return
        used = set(topk_ids.reshape(-1).tolist())  # the engine already synced on these ids
        if job.inline:
            self._after_routing_inline(engine, job, moe_layer, hidden, used)
            return
        if self.predictor.config.prev_token_routing:
            batch, seq = job.embeds.shape[:2]
            # each row's last token: the previous token of the next decode step
            self._last_routing[moe_layer] = topk_ids.reshape(batch, seq, -1)[:, -1].detach()
        with self._lock:
            job.layers_done = moe_layer + 1
            self._m["layers_seen"] += 1
            if job.ready.is_set() and job.predicted:
                pred = job.predicted[moe_layer]
                self._m["hits"] += len(used & pred)
                self._m["needed"] += len(used)
                self._m["predicted"] += len(pred)
            else:
                self._m["late_layers"] += 1
        nxt = moe_layer + 1
        if nxt >= len(engine.moe_layers) or self.correction == "none":
            return
        # copies, so that the caller may reuse its buffers; the worker's stream waits for them
        written = None
        hidden, topk_ids = hidden.detach().clone(), topk_ids.detach().clone()
        if self._reads_previous and nxt == len(engine.moe_layers) - 1:
            batch, seq = job.embeds.shape[:2]
            # each row's last token: the previous token of the next decode step (a view of the copy
            # above, which nothing writes: no second copy per step)
            self._last_state = hidden.reshape(batch, seq, -1)[:, -1]
        if hidden.device.type == "cuda":
            written = torch.cuda.Event()
            written.record(torch.cuda.current_stream(hidden.device))
        self._put(_Correction(job, moe_layer, hidden, topk_ids, written))

    def route(
        self, moe_layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.hash_routing:
            return topk_ids, topk_weights
        job = self._current
        if job is None:
            raise RuntimeError("hash routing: route() called before begin_forward()")
        job.ready.wait()
        if job.error is not None:
            raise RuntimeError("the predictor thread failed") from job.error
        logits = job.logits[moe_layer].to(hidden.device)
        if self.hash_weights == "predicted":
            logits = self.predictor.weight_logits(logits, moe_layer)
        if logits.shape[0] != topk_ids.shape[0]:
            raise RuntimeError(f"hash routing: {logits.shape[0]} predicted tokens, layer {moe_layer} has {topk_ids.shape[0]}")
        router = self._require_engine().moe_layers[moe_layer].router
        router_logits = None
        if self.hash_weights == "router":
            out = router(hidden)
            router_logits = (out[0] if isinstance(out, (tuple, list)) else out).reshape(logits.shape)
        ids, weights = hash_route(logits, topk_ids.shape[-1], router_normalizes(router), router_logits,
                                  dtype=topk_weights.dtype)
        return ids.to(topk_ids.dtype), weights

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._inline_stream is not None:
            self._inline_stream.synchronize()  # no replay may still run when the graphs are freed
        self._clear_programs()
        self._inline = None
        self._lookaheads = {}
        self._thread = None
        self._engine = None
        self._current = None
        self._decoders = {}  # frees the graphs' memory; the next attach captures again
        self._live = None

    # ------------------------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, float]:
        """``hit_rate``: used experts that were predicted / used (layers whose prediction was ready);
        ``precision``: predicted-and-used / predicted; ``late_fraction``: layers that ran before the
        forward's prediction was ready; ``predictor_ms_per_token``: the thread's compute time;
        ``corrections``: experts queued by the thread's next-layer corrections (inline ones are counted
        by the engine's ``deferred_queued`` stat); ``inline_forwards``: decode tokens predicted
        inline, ``native_forwards`` of them by native program launches (GPU); ``graph_steps``: decode tokens
        predicted by a graph replay (or, on the CPU, the graphed step run eagerly). Covers every
        forward begun so far: waits (bounded) for the thread to finish predicting the newest one."""
        job = self._current
        if job is not None and self._thread is not None and self._thread.is_alive():
            job.ready.wait(timeout=30.0)
            self.wait_idle(timeout=30.0)
        with self._lock:
            m = dict(self._m)
        return {
            "hit_rate": m["hits"] / m["needed"] if m["needed"] else 0.0,
            "precision": m["hits"] / m["predicted"] if m["predicted"] else 0.0,
            "late_fraction": m["late_layers"] / m["layers_seen"] if m["layers_seen"] else 0.0,
            "predictor_ms_per_token": 1e3 * m["predict_seconds"] / m["tokens"] if m["tokens"] else 0.0,
            "predictor_ms_per_forward": 1e3 * m["predict_seconds"] / m["forwards"] if m["forwards"] else 0.0,
            "corrections": float(m["corrections"]),
            "forwards": float(m["forwards"]),
            "graph_steps": float(m["graph_steps"]),
            "inline_forwards": float(m["inline_forwards"]),
            "native_forwards": float(m["native_forwards"]),
        }

    def reset_metrics(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self._m = dict.fromkeys(
                ("hits", "needed", "predicted", "late_layers", "layers_seen", "predict_seconds", "tokens",
                 "forwards", "corrections", "graph_steps", "inline_forwards", "native_forwards"), 0)

    # ------------------------------------------------------------------------------ internals
    def _set_device(self, device: torch.device) -> None:
        if self._thread is not None and self._thread.is_alive() and device != self.device:
            raise RuntimeError("the predictor's device cannot change while its thread runs")
        if device != self.device:
            self._clear_programs()
            self._decoders = {}  # captured with the parameters' old addresses
            self._lookaheads = {}
            self._live = None
            self._inline = None
        self.device = device
        self.predictor.to(device)
        if self.cuda_graph is None:
            self._use_graphs = device.type == "cuda" and GraphedDecoder.unsupported(self.predictor) is None
        else:
            self._use_graphs = self.cuda_graph

    def _require_engine(self) -> OffloadEngine:
        if self._engine is None:
            raise RuntimeError("RunAheadPrefetcher used before attach()")
        return self._engine

    def _previous_token_routing(self, batch: int) -> torch.Tensor | None:
        """``[B, 1, L*E]`` multi-hot of the last token's experts in every MoE layer (decode variant),
        on the compute device; None when the predictor does not take it or a layer is missing."""
        cfg = self.predictor.config
        last = self._last_routing
        if not cfg.prev_token_routing or any(ids is None or ids.shape[0] != batch for ids in last):
            return None
        return routing_multi_hot(torch.stack(last), cfg.num_experts).unsqueeze(1)

    def _to_predictor_device(
        self, x: torch.Tensor, *extra: torch.Tensor | None
    ) -> tuple[tuple[torch.Tensor | None, ...], torch.cuda.Event | None]:
        """``x`` and ``extra`` (optional tensors on ``x``'s device) on the predictor's device, and an
        event the worker waits on before reading them (None: ready now)."""
        tensors = (x, *extra)
        if x.device == self.device or (x.device.type == self.device.type == "cuda" and self.device.index is None):
            if x.device.type != "cuda":
                return tensors, None
            # same GPU: the worker's stream must not read the embeddings before they are written
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(x.device))
            return tensors, event
        if x.device.type == "cuda":
            # Asynchronous: a side stream waits for the embeddings, copies them to pinned memory and
            # records an event the worker waits on; the compute stream never blocks.
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(device=x.device)
            stream = self._copy_stream
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                copies = []
                for src in tensors:
                    if src is None:
                        copies.append(None)
                        continue
                    dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=self.device.type == "cpu",
                                      device="cpu" if self.device.type == "cpu" else self.device)
                    dst.copy_(src, non_blocking=True)
                    src.record_stream(stream)
                    copies.append(dst)
                event = torch.cuda.Event()
                event.record(stream)
            return tuple(copies), event
        return tuple(None if t is None else t.to(self.device) for t in tensors), None

    def _put(self, item: _Job | _Correction) -> None:
        with self._idle:
            self._outstanding += 1
        self._queue.put(item)

    def _done(self, count: int) -> None:
        with self._idle:
            self._outstanding -= count
            if self._outstanding <= 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until the thread has handled every prediction and correction queued so far, and the
        engine every inline (deferred) prefetch; False when ``timeout`` (seconds) passed first."""
        with self._idle:
            done = self._idle.wait_for(lambda: self._outstanding <= 0 or self._thread is None
                                       or not self._thread.is_alive(), timeout)
        engine = self._engine
        if engine is not None and engine.cache is not None:
            done = engine.wait_deferred(timeout) and done
            error = engine.cache.take_deferred_error()
            if error is not None:
                warnings.warn(f"RunAheadPrefetcher: an inline prefetch failed ({error})", RuntimeWarning, stacklevel=2)
        return done

    # --------------------------------------------------------------------------- inline decode
    def _inline_unsupported(self, engine: OffloadEngine) -> str | None:
        """Why decode tokens cannot be predicted inline with ``engine`` (None: they can)."""
        if not self._use_graphs:
            return "it needs the graphed decoder (cuda_graph on, a plain HashPredictor)"
        if self.hash_routing:
            return "hash routing reads the prediction's logits on the thread"
        if self.correction not in ("lookahead", "none"):
            return f"correction={self.correction!r} runs on the thread (inline: 'lookahead' or 'none')"
        if self.predictor.config.prev_token_routing:
            return "the decode variant (prev_token_routing) is predicted on the thread"
        mine, theirs = self.device, torch.device(engine.device)
        if mine.type != theirs.type or (mine.type == "cuda" and (mine.index or 0) != (theirs.index or 0)):
            return f"the predictor ({mine}) must run on the model's device ({theirs})"
        return None

    def _inline_context(self, device: torch.device):
        """The inline programs' stream, ordered after the compute stream's work so far (GPU)."""
        if device.type != "cuda":
            return contextlib.nullcontext()
        if self._inline_stream is None:
            self._inline_stream = torch.cuda.Stream(device)
        self._inline_stream.wait_stream(torch.cuda.current_stream(device))
        return torch.cuda.stream(self._inline_stream)

    def _begin_inline(self, x: torch.Tensor) -> bool:
        """Predict this decode token on the inference thread (module docstring, "Inline decode");
        False when the sequence is not (or no longer) decoded inline."""
        decoder = self._inline
        first = decoder is None
        if first:
            prompt = self._current
            if prompt is None or not prompt.fresh:
                return False  # this sequence decodes on the thread (its state is the eager one)
            prompt.ready.wait()  # the prompt's prediction loads the decoder (done long before, as a rule)
            decoder = self._live
            if decoder is None or prompt.error is not None or decoder.batch != x.shape[0]:
                return False
            self._live = None  # handed over: the inference thread owns the state now
            self._inline = decoder
        if decoder.full:
            self._leave_inline(fresh=False)
            return False
        engine = self._require_engine()
        t0 = time.perf_counter()
        programs = self._programs_for(engine, x.shape[0])
        if programs is not None and x.dtype == decoder.input_dtype and x.is_contiguous():
            if first and self._reads_previous:
                with self._inline_context(x.device):
                    self._set_first_previous(decoder, x.shape[0])
            self._last_state = None
            # one native call: the input copied on the compute stream, the graph launched on the
            # inline stream after it, its top-k deferred to the engine's thread
            engine.cache.run_program(programs[0], [x.data_ptr()], torch.cuda.current_stream(x.device).cuda_stream,
                                     engine.generation, "prefetch", self.feed_future, True, True, False)
            decoder.advance()
            self._inline_done(engine, x, t0, programs)
            return True
        with self._inline_context(x.device):
            if x.device.type == "cuda":
                x.record_stream(torch.cuda.current_stream(x.device))
            if first and self._reads_previous:
                self._set_first_previous(decoder, x.shape[0])
            self._last_state = None
            _, ids = decoder.step(x)
            engine.prefetch_deferred(ids.view(len(self._all_layers), -1), self._all_layers, "prefetch",
                                     engine.generation, future=self.feed_future, skip_routed=True, remember=True)
        self._inline_done(engine, x, t0)
        return True

    def _set_first_previous(self, decoder: GraphedDecoder, batch: int) -> None:
        """The first inline token reads the prompt's last tokens' layer L-2 state (inline stream)."""
        state = self._last_state
        if state is not None and state.device.type == "cuda":
            state.record_stream(torch.cuda.current_stream(state.device))
        decoder.set_previous(state if state is not None and state.shape[0] == batch else None)

    def _programs_for(self, engine: OffloadEngine, batch: int) -> tuple[int, dict[int, int]] | None:
        """Native program ids of the batch's decoder and lookahead graphs in the engine's cache,
        registered on first use (and again after the engine reopened its cache); None when the
        graphs are not captured or the installed torch cannot hand them out."""
        cache = engine.cache
        if cache is None or cache.backend_kind != "cuda":
            return None
        if self._inline_stream is None:
            self._inline_stream = torch.cuda.Stream(self.device)
        if self._program_cache is not cache:
            self._programs, self._program_cache = {}, cache
        found = self._programs.get(batch)
        if found is not None:
            return found if found[0] >= 0 else None
        decoder, lookahead = self._decoders.get(batch), self._lookaheads.get(batch)
        spec = None if decoder is None else decoder.program()
        if spec is None or (self.correction == "lookahead" and lookahead is None):
            self._programs[batch] = (-1, {})
            return None
        stream = self._inline_stream.cuda_stream
        ids = cache.register_program(spec[0], spec[1], spec[2], self._all_layers, batch * self.k, stream)
        layers: dict[int, int] = {}
        if self.correction == "lookahead":
            for layer in lookahead.layers:
                lspec = lookahead.program(layer)
                if lspec is None:
                    self._programs[batch] = (-1, {})
                    return None
                layers[layer] = cache.register_program(lspec[0], lspec[1], lspec[2], [layer], batch * self.k, stream)
        self._programs[batch] = (ids, layers)
        return self._programs[batch]

    def _clear_programs(self) -> None:
        cache, self._program_cache, self._programs = self._program_cache, None, {}
        if cache is not None and not cache.closed:
            cache.clear_programs()

    def _inline_done(self, engine: OffloadEngine, x: torch.Tensor, t0: float,
                     programs: tuple[int, dict[int, int]] | None = None) -> None:
        """Book an inline token: its job (for ``after_routing``; ``programs`` when launched
        natively) and the metrics."""
        self._current = _Job(engine.generation, x, None, None, False, x.shape[0], ready=self._ready, inline=True,
                             programs=programs)
        elapsed = time.perf_counter() - t0
        with self._lock:
            self._m["predict_seconds"] += elapsed
            self._m["tokens"] += x.shape[0]
            self._m["forwards"] += 1
            self._m["graph_steps"] += 1
            self._m["inline_forwards"] += 1
            self._m["native_forwards"] += programs is not None

    def _leave_inline(self, fresh: bool) -> None:
        """Stop decoding inline (inference thread). A fresh sequence: the decoder goes back to the
        thread's pool, after the inline stream's work. Otherwise (capacity reached) the thread
        continues the sequence eagerly from the decoder's state."""
        decoder, self._inline = self._inline, None
        if decoder is None:
            return
        if self._inline_stream is not None:
            torch.cuda.current_stream(self._inline_stream.device).wait_stream(self._inline_stream)
        if not fresh:
            self._state = decoder.to_state()  # the thread has nothing queued for this sequence
            if self._reads_previous:
                self._last_state = decoder._previous.clone()

    def _after_routing_inline(self, engine: OffloadEngine, job: _Job, moe_layer: int, hidden: torch.Tensor,
                              used: set[int]) -> None:
        """``after_routing`` of an inline token: metrics from the remembered prediction, and the
        next layer's lookahead correction as a graph replay whose top-k the engine's native thread
        prefetches (minus the prediction) once computed."""
        predicted = engine.cache.deferred_predicted(job.generation, moe_layer)
        with self._lock:
            self._m["layers_seen"] += 1
            if predicted is None:
                self._m["late_layers"] += 1
            else:
                self._m["hits"] += len(used.intersection(predicted))
                self._m["needed"] += len(used)
                self._m["predicted"] += len(predicted)
        nxt = moe_layer + 1
        lookahead = self._lookaheads.get(job.embeds.shape[0])
        if nxt >= len(self._all_layers) or self.correction != "lookahead" or lookahead is None:
            return
        t0 = time.perf_counter()
        if job.programs is not None and hidden.dtype == lookahead.input_dtype and hidden.is_contiguous():
            # one native call (see _begin_inline); the last layer's program also keeps layer L-2's
            # router input as the next token's previous-token state
            engine.cache.run_program(job.programs[1][nxt], [hidden.data_ptr()],
                                     torch.cuda.current_stream(hidden.device).cuda_stream,
                                     job.generation, "demand", False, False, False, True)
        else:
            with self._inline_context(hidden.device):
                if hidden.device.type == "cuda":
                    hidden.record_stream(torch.cuda.current_stream(hidden.device))
                ids = lookahead.run(nxt, hidden.detach())  # the last layer's also keeps the previous state
                engine.prefetch_deferred(ids, [nxt], "demand", job.generation, exclude_predicted=True)
        with self._lock:
            self._m["predict_seconds"] += time.perf_counter() - t0

    def _correct(self, fix: _Correction) -> None:
        """Queue on the demand lane the experts the correction adds to layer ``fix.layer + 1``'s
        prediction (worker thread; see the module docstring for the kinds)."""
        engine, job = self._engine, fix.job
        if engine is None or engine.generation != job.generation:
            return  # that forward is over
        nxt = fix.layer + 1
        if fix.written is not None:
            torch.cuda.current_stream(fix.hidden.device).wait_event(fix.written)
        ready = job.ready.is_set() and job.logits is not None and job.error is None
        if self.correction == "gate" or (self.correction in ("fused", "lookahead") and not ready):
            ids = engine.moe_layers[nxt].predict(fix.hidden)
        elif self.correction == "lookahead":
            logits = job.logits[nxt]  # [T, E]
            looked = self.predictor.look_ahead(logits, nxt, fix.hidden.reshape(logits.shape[0], -1), job.previous)
            ids = looked.topk(self.k, dim=-1).indices
        elif self.correction == "fused":
            gate = engine.moe_layers[nxt].gate_logits(fix.hidden)
            fused = self.predictor.fuse(job.logits[nxt], nxt, gate.reshape(job.logits.shape[1], -1))
            ids = fused.topk(self.k, dim=-1).indices
        else:  # refine: needs this forward's prediction
            if not ready:
                return
            dev = job.logits.device
            ids = self.predictor.refine(job.logits[nxt], nxt, fix.topk_ids.to(dev).reshape(job.logits.shape[1], -1))
            ids = ids.topk(self.k, dim=-1).indices
        extra = set(self._to_host(ids.reshape(-1)).tolist())
        if ready and job.predicted:
            extra -= job.predicted[nxt]
        if extra and engine.generation == job.generation:
            engine.prefetch(nxt, sorted(extra), "demand", job.generation)
            with self._lock:
                self._m["corrections"] += len(extra)

    def _worker(self) -> None:
        # on a GPU the predictor runs on its own stream, beside the model's
        stream_ctx = torch.cuda.stream(torch.cuda.Stream(self.device)) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.inference_mode(), stream_ctx:
            while True:
                jobs = [self._queue.get()]
                # Coalesce what queued up meanwhile: when the model outpaces the predictor, one call
                # catches up on every pending decode token instead of falling further behind.
                while jobs[-1] is not None:
                    try:
                        jobs.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = jobs[-1] is None
                items = jobs[:-1] if stop else jobs
                pending = [j for j in items if isinstance(j, _Job)]
                # predictions first: a correction is queued after its forward's job
                for run in self._runs(pending):
                    try:
                        self._predict(run)
                    except BaseException as exc:  # noqa: BLE001 -- reported through the jobs
                        for job in run:
                            job.error = exc
                    finally:
                        for job in run:
                            job.ready.set()
                for fix in items:
                    if isinstance(fix, _Correction):
                        try:
                            self._correct(fix)
                        except Exception as exc:  # noqa: BLE001 -- an optimisation: never fail the model
                            warnings.warn(f"RunAheadPrefetcher: next-layer correction failed ({exc!r})",
                                          RuntimeWarning, stacklevel=1)
                self._done(len(items))
                if stop:
                    return

    @staticmethod
    def _runs(jobs: list[_Job]) -> list[list[_Job]]:
        """Consecutive jobs that continue one sequence (not fresh, same batch), to predict together."""
        runs: list[list[_Job]] = []
        for job in jobs:
            if runs and not job.fresh and job.embeds.shape[0] == runs[-1][-1].embeds.shape[0]:
                runs[-1].append(job)
            else:
                runs.append([job])
        return runs

    def _decoder_for(self, batch: int, dtype: torch.dtype | None = None) -> GraphedDecoder | None:
        """The graphed decoder for ``batch`` (inference thread), built and captured on first use.
        Captured here, not on the worker: a capture fails if another thread synchronizes the whole
        device meanwhile (``torch.cuda.synchronize`` between prefill and decode, say), and this is
        the thread that would."""
        decoder = self._decoders.get(batch)
        if decoder is not None or len(self._decoders) >= _MAX_GRAPHED_BATCHES:
            return decoder
        try:
            decoder = GraphedDecoder(self.predictor, batch, self.graph_max_len, k=self.k, first_head=self._reads_previous,
                                     input_dtype=dtype)
            decoder.capture()
            if self.correction == "lookahead" and self._inline_ok:
                lookahead = GraphedLookahead(decoder, input_dtype=dtype)
                lookahead.capture()
                self._lookaheads[batch] = lookahead
        except Exception as exc:  # noqa: BLE001 -- an optimisation: fall back to the eager path
            warnings.warn(f"RunAheadPrefetcher: CUDA graph of the predictor failed ({exc!r}); predicting eagerly",
                          RuntimeWarning, stacklevel=3)
            self._use_graphs = False
            return None
        self._decoders[batch] = decoder
        return decoder

    def _predict(self, run: list[_Job]) -> None:
        for job in run:
            if job.copied is not None:
                job.copied.synchronize()
        t0 = time.perf_counter()
        outputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # per job: logits [L, B, S, E], ids [L, B, S, k]
        done = 0  # jobs of the run predicted so far
        graph_steps = 0
        if run[0].fresh:
            self._live = None
            if self._use_graphs:
                # the prompt: eager forward, then its state into the static buffers
                outputs += self._predict_eager(run[:1])
                done = 1
                decoder = self._decoders.get(run[0].embeds.shape[0])
                if decoder is not None and decoder.load(self._state):
                    self._live = decoder  # from now on it holds the sequence's state, not self._state
        first = done  # the graph steps are jobs first .. first + graph_steps - 1
        while done < len(run) and self._live is not None:
            decoder = self._live
            if decoder.full or decoder.batch != run[done].embeds.shape[0]:
                self._state = decoder.to_state()  # continue eagerly (capacity reached)
                self._live = None
                break
            job = run[done]
            if decoder.first_head:
                decoder.set_previous(job.previous)
            logits, ids = decoder.step(job.embeds, job.prev_routing)
            outputs.append((logits.clone(), ids.clone()))  # the next replay overwrites them
            done += 1
            graph_steps += 1
        if done < len(run):
            outputs += self._predict_eager(run[done:])
        if self._reads_previous:
            # graph steps applied layer 0's head already (GraphedDecoder(first_head=True))
            outputs = [out if first <= i < first + graph_steps else self._first_layer_head(job, *out)
                       for i, (job, out) in enumerate(zip(run, outputs))]
        host_ids = self._to_host(torch.cat([ids.reshape(-1) for _, ids in outputs]))
        start = 0
        for job, (logits, ids) in zip(run, outputs):
            job.logits = logits.reshape(logits.shape[0], -1, logits.shape[-1])  # [L, T, E]
            rows = host_ids[start : start + ids.numel()].view(ids.shape)
            job.predicted = [set(row.reshape(-1).tolist()) for row in rows]
            start += ids.numel()
        elapsed = time.perf_counter() - t0
        with self._lock:
            self._m["predict_seconds"] += elapsed
            self._m["tokens"] += sum(job.tokens for job in run)
            self._m["forwards"] += len(run)
            self._m["graph_steps"] += graph_steps
        job = run[-1]  # only the newest forward can still use prefetches
        engine = self._engine
        if engine is None or engine.generation != job.generation:
            return  # a newer forward started: these prefetches would be stale
        predicted = job.predicted
        with self._lock:
            done = job.layers_done  # layers that ran before the prediction was ready get nothing
        if self.feed_future:
            # visit i of the future is the acquire call i from now: the first layer not yet routed
            engine.set_future([(layer, sorted(predicted[layer])) for layer in range(done, len(predicted))])
        for layer in range(done, len(predicted)):
            if engine.generation != job.generation:
                break
            engine.prefetch(layer, sorted(predicted[layer]), "prefetch", job.generation)

    def _first_layer_head(self, job: _Job, logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer 0's prediction corrected by its previous-token head: from the tokens' embeddings and
        (decode) the previous token's state; ``logits`` stay the run-ahead ones the later heads read."""
        num_experts, tokens = logits.shape[-1], logits[0].numel() // logits.shape[-1]
        previous = None if job.previous is None else job.previous.reshape(tokens, -1)
        looked = self.predictor.look_ahead(logits[0].reshape(tokens, num_experts), 0,
                                           job.embeds.reshape(tokens, -1), previous)
        ids = ids.clone()
        ids[0] = looked.topk(self.k, dim=-1).indices.view(ids.shape[1:]).to(ids.device)
        return logits, ids

    def _predict_eager(self, run: list[_Job]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``HashPredictor.forward`` on the run's tokens together (state: ``self._state``, reset for
        a fresh sequence); per job its logits ``[L, B, S, E]`` and top-k ids (on the device)."""
        x = torch.cat([job.embeds for job in run], dim=1) if len(run) > 1 else run[0].embeds
        x = x.to(self.device, torch.float32)
        mask = None
        if any(job.mask is not None for job in run):
            mask = torch.cat([job.mask.to(self.device) if job.mask is not None
                              else torch.ones(job.embeds.shape[:2], dtype=torch.long, device=self.device)
                              for job in run], dim=1)
            if bool(mask.all()):  # no padding: the cheaper unmasked path (syncs this thread only)
                mask = None
        prev = None
        if any(job.prev_routing is not None for job in run):
            width = self.predictor.config.num_moe_layers * self.predictor.config.num_experts
            prev = torch.cat([job.prev_routing.to(self.device, torch.float32) if job.prev_routing is not None
                              else torch.zeros(*job.embeds.shape[:2], width, device=self.device)
                              for job in run], dim=1)
        state = None if run[0].fresh else self._state
        if prev is None:
            logits, self._state = self.predictor(x, state, mask)  # [L, B, S, E]
        else:
            logits, self._state = self.predictor(x, state, mask, prev_token_routing=prev)
        ids = logits.topk(self.k, dim=-1).indices
        out, start = [], 0
        for job in run:
            seq = job.embeds.shape[1]
            out.append((logits[:, :, start : start + seq], ids[:, :, start : start + seq]))
            start += seq
        return out

    @staticmethod
    def _to_host(ids: torch.Tensor) -> torch.Tensor:
        """``ids`` on the host. From a GPU: into pinned memory without blocking, then a wait on an
        event, which (unlike ``tolist()`` on the device tensor) releases the GIL while it waits."""
        if ids.device.type != "cuda":
            return ids
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        host.copy_(ids, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(ids.device))
        copied.synchronize()
        return host


def load_prefetcher(path: str | os.PathLike, device: str | None = None, **kwargs) -> RunAheadPrefetcher:
    """A :class:`RunAheadPrefetcher` for the predictor saved in ``path`` (``predictor.json`` +
    ``predictor.safetensors``, e.g. in the model's directory); ``device`` None: the model's.
    ``kwargs`` go to the constructor."""
    return RunAheadPrefetcher(HashPredictor.load(path), device=device, **kwargs)


__all__ = ["RunAheadPrefetcher", "load_prefetcher"]
