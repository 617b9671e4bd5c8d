"""SiDA's predictor as the engine's prefetcher: the hash function predicts every MoE layer's experts
of a token from its embedding; the cache loads them while the layers run, and the predictive
eviction policy ranks resident experts by their predicted next use.

Where the prediction runs (nothing here waits for the device, and there is no thread):

- **Prompt** (prefill, the acquire path): ``HashPredictor.forward`` over the prompt in
  ``begin_forward``; its top-k ids reach the cache through ``engine.prefetch_deferred`` (a native thread
  reads them once computed and queues one row of prefetches per MoE layer).
- **Decode**: a :class:`~sida_moe.predictor.graphed.GraphedDecoder` holds the sequence's predictor
  state in static buffers, so its step has fixed shapes.
  - In the greedy loop (``sida_moe.decode_graph``) the step predicts from the token each decode
    step has just chosen (``predict_ahead``). A captured decode step only stages the predictor's
    inputs; after each replay the engine launches the predictor's own captured step on a side
    stream (:class:`~sida_moe.predictor.side_step.SideStep`), where it runs beside the next decode
    step, and hands its ids over (``hand_over_ahead``); the decode steps never wait for a
    prediction (with hash routing, which routes by it, they do). By then the host has launched the
    step they name (replays are queued ahead), so copies of them would land after that step read
    those experts from the pool, doubling their bytes on the link: a replayed step's predictions
    feed the predictive policy and the scores only. A predictor of the next token's routing
    (below) names a step its copies can reach, and its predictions are prefetched.
  - In an eager loop (transformers' ``generate``: sampling, processors) the step runs in
    ``begin_forward`` on the token being decoded, before its layers.
  Past the decoder's capacity a sequence continues with ``HashPredictor.forward`` on its state.

Every decode prediction is remembered by the cache and scored against the layer's routing when it
arrives (``metrics``: recall and precision over decode tokens).

A predictor trained on the next token's routing (``TrainConfig(target_shift=1)``) is served the
same way, its decode predictions handed over for the step after the one their token feeds
(``prefetch_deferred(after_next=True)``): in the greedy loop a prediction made at the end of step
t names step t+2, which its copies can reach, where a prediction of step t+1 lands after it ran.
Its prompt prediction covers the prompt's tokens but the first and the first decoded token.

Hash routing (``hash_routing=True``, opt-in, lossy): ``route`` returns the predicted experts instead
of the router's (device ops only, so it is captured with the step), weighted by the predictor's
softmax (``hash_weights="predicted"``, the paper's mode) or by the router's softmax at those experts
(``"router"``: one extra router matmul, far closer to exact).

The predictor's lookahead heads and fused gate weights (research variants, ``train_lookahead``) are
not used here: a correction computed at layer l of a replayed step cannot reach the cache before
layer l + 1 has read its experts.
"""

from __future__ import annotations

import copy
import os
import weakref
from typing import TYPE_CHECKING

import torch

from sida_moe.predictor.graphed import GraphedDecoder
from sida_moe.predictor.hash_routing import WeightSource, hash_route, router_normalizes
from sida_moe.predictor.model import HashPredictor, PredictorState
from sida_moe.predictor.side_step import SideStep

if TYPE_CHECKING:
    from sida_moe.engine import OffloadEngine

DECODE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_CAPACITY = 2048  # decoder tokens of an eager loop (the greedy loop sizes its own)
MAX_DECODERS = 8  # decoders kept per prefetcher, least recently used dropped first


class SidaPrefetcher:
    """SiDA's predictor as a prefetcher (see the module docstring).

    - ``predictor``: a trained :class:`HashPredictor` matching the model's MoE layers and experts;
      it is moved to the model's device at ``attach``.
    - ``k``: experts prefetched per token and layer (default: the predictor's top-k).
    - ``feed_future``: feed the predictions to the predictive policy (``set_future``).
    - ``prefetch``: queue copies of the predicted experts (default; a replayed step's own-token
      predictions never: module docstring). False: decode predictions only feed the policy (with
      the predictive policy: eviction and admission by predicted next use) and the scores; no
      copies of their own (the prompt's predictions still prefetch).
    - ``hash_routing`` / ``hash_weights``: the opt-in lossy mode (module docstring).
    - ``decode_dtype``: the dtype of the decode steps' network (a copy of the predictor; the
      prompt's forward stays in the predictor's float32). Default: bfloat16 on CUDA (half the
      bytes and time of a step beside the decode step, the same held-out recall:
      ``benches/predictor_dtype_recall.py``), float32 elsewhere.
    """

    name = "sida"

    def __init__(self, predictor: HashPredictor, k: int | None = None, feed_future: bool = True,
                 hash_routing: bool = False, hash_weights: WeightSource = "predicted", prefetch: bool = True,
                 decode_dtype: torch.dtype | None = None) -> None:
        if not isinstance(predictor, HashPredictor):
            raise TypeError(f"predictor must be a HashPredictor, got {type(predictor).__name__}")
        reason = GraphedDecoder.unsupported(predictor)
        if reason is not None:
            raise ValueError(f"this predictor cannot be served: {reason}")
        if hash_routing:
            predictor.config.require_own_routing("hash routing")
        if hash_weights not in ("predicted", "router"):
            raise ValueError(f"hash_weights must be 'predicted' or 'router', got {hash_weights!r}")
        cfg = predictor.config
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= cfg.num_experts):
            raise ValueError(f"k must be an int in [1, {cfg.num_experts}], got {k!r}")
        self.predictor = predictor.eval()
        self.k = k or cfg.top_k
        if not isinstance(prefetch, bool):
            raise TypeError(f"prefetch must be a bool, got {prefetch!r}")
        if decode_dtype is not None and decode_dtype not in DECODE_DTYPES:
            raise ValueError(f"decode_dtype must be one of {', '.join(map(str, DECODE_DTYPES))} or None (bfloat16 "
                             f"on CUDA, else float32), got {decode_dtype!r}")
        self._decode_dtype_asked = decode_dtype
        self._decode_net: HashPredictor | None = None  # the decoders' network (attach)
        self.feed_future = bool(feed_future)
        self.prefetch = prefetch
        self.hash_routing = bool(hash_routing)
        self.hash_weights = hash_weights
        self._layers = list(range(cfg.num_moe_layers))
        self._engine: OffloadEngine | None = None
        self._forget_decoders()
        self._next_capacity: int | None = None  # set by begin_sequence for its prompt only
        self._static_mask = False  # set by begin_sequence for its sequence only
        self._reset_sequence()

    # ------------------------------------------------------------------------------ protocol
    def attach(self, engine: OffloadEngine) -> None:
        layers = engine.moe_layers
        cfg = self.predictor.config
        if len(layers) != cfg.num_moe_layers:
            raise ValueError(f"the predictor covers {cfg.num_moe_layers} MoE layers, the model has {len(layers)}")
        if any(layer.num_experts != cfg.num_experts for layer in layers):
            raise ValueError(f"the predictor predicts {cfg.num_experts} experts per layer, the model has "
                             f"{sorted({layer.num_experts for layer in layers})}")
        moved = self.predictor.compress.weight.device != engine.device
        self.predictor.to(engine.device)
        dtype = self._decode_dtype_asked or (torch.bfloat16 if engine.device.type == "cuda" else torch.float32)
        if moved or self._decode_net is None or self.decode_dtype != dtype:
            self._forget_decoders()  # built on the parameters' old addresses, or in another dtype
            same = dtype == self.predictor.compress.weight.dtype
            self._decode_net = self.predictor if same else copy.deepcopy(self.predictor).to(dtype).eval()
        self._engine = engine
        self._reset_sequence()

    def begin_sequence(self, batch: int, length: int, static_mask: bool = False) -> None:
        """A new sequence of ``batch`` rows and at most ``length`` tokens starts with the next
        forward (the greedy loop says so; an eager loop is recognised in ``begin_forward``).
        ``static_mask``: its forwards take one attention mask of the whole length (the prompt's
        columns first, then ones), so the mask's length says nothing about continuity."""
        self._reset_sequence()
        self._next_capacity = max(int(length), 1)
        self._static_mask = bool(static_mask)

    def begin_forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        engine = self._require_engine()
        x = inputs_embeds if inputs_embeds.dim() == 3 else inputs_embeds.unsqueeze(0)
        batch, seq = x.shape[:2]
        if seq > 1 and self._next_capacity is None:
            self._static_mask = False  # a prompt no greedy loop announced: an eager loop's
        total = attention_mask.shape[-1] if attention_mask is not None and not self._static_mask else None
        # a new sequence unless this forward continues the one predicted so far (cached decode: one
        # token, and a mask -- when given -- one longer than the tokens seen)
        fresh = (seq > 1 or self._batch != batch or self._fresh
                 or (total is not None and total != self._seen + seq))
        self._seen = (0 if fresh else self._seen) + seq
        if fresh:
            self._predict_prompt(engine, x, attention_mask)
            return
        if self._ahead:
            self._ahead = False  # predicted at the end of the previous step
            return
        self._submit(engine, self._predict_token(x))

    def predict_ahead(self, next_embeds: torch.Tensor, compiled: bool = False) -> SideStep | bool:
        """At the end of a decode step: predict the next step's token (``[B, 1, H]`` embeddings),
        on the device only; ``hand_over_ahead`` submits the ids. Inside the capture of a decode
        step only the predictor's inputs are staged, and the :class:`~sida_moe.predictor.side_step.SideStep`
        they were staged into is returned: its step runs beside the next decode step, launched at
        each replay's hand-over. ``compiled``: the step is compiled (``torch.compile``), so the
        predictor's is too. True if it predicted now, False if nothing was predicted (a captured
        step of a sequence past the decoder's capacity)."""
        self._require_engine()
        x = next_embeds if next_embeds.dim() == 3 else next_embeds.unsqueeze(1)
        if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            decoder = self._decoder
            if decoder is None or decoder.full:
                self._rows, self._ahead = None, False
                return False
            side = self._sides[self._key_of(decoder), bool(compiled)]
            side.stage(x.detach())
            self._rows = decoder.topk_ids.reshape(len(self._layers), -1)
            self._logits = decoder.logits.reshape(len(self._layers), -1, decoder.logits.shape[-1])
            self._ahead = True
            return side
        self._rows = self._predict_token(x, compiled)
        self._ahead = True
        return True

    def capture_ahead(self, staged: SideStep) -> None:
        """After the capture of a decode step that staged a prediction into ``staged``: capture
        the predictor's step that each hand-over launches."""
        if not isinstance(staged, SideStep):
            raise TypeError(f"capture_ahead takes what predict_ahead staged into, got {type(staged).__name__}")
        staged.capture()

    def hand_over_ahead(self, replayed: bool, staged: SideStep | None = None) -> None:
        """Give the cache the ids of the last ``predict_ahead`` (after it ran; ``replayed``: after a
        replay of the captured step that staged it into ``staged``, whose predictor step is
        launched here)."""
        engine = self._require_engine()
        if self._rows is None:
            return
        if not replayed:
            self._submit(engine, self._rows)
            return
        if staged is None or staged.decoder is not self._decoder:
            raise RuntimeError("a replayed step predicted through a decoder this prefetcher no longer holds")
        stream = staged.launch()
        self._seen += 1
        with torch.cuda.stream(stream):  # the ids are written there
            self._submit(engine, self._rows, late=True)

    def after_routing(self, moe_layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor) -> None:
        return None  # decode predictions are scored by the cache, from the routed rows

    def route(
        self, moe_layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.hash_routing:
            return topk_ids, topk_weights
        if self._logits is None:
            raise RuntimeError("hash routing: route() called before begin_forward()")
        logits = self._logits[moe_layer]  # [T, E]
        if logits.shape[0] != topk_ids.shape[0]:
            raise RuntimeError(f"hash routing: {logits.shape[0]} predicted tokens, layer {moe_layer} has {topk_ids.shape[0]}")
        if self.hash_weights == "predicted":
            logits = self.predictor.weight_logits(logits, moe_layer)
        router = self._require_engine().moe_layers[moe_layer].router
        router_logits = None
        if self.hash_weights == "router":
            out = router(hidden)
            router_logits = (out[0] if isinstance(out, (tuple, list)) else out).reshape(logits.shape)
        ids, weights = hash_route(logits, topk_ids.shape[-1], router_normalizes(router), router_logits,
                                  dtype=topk_weights.dtype)
        return ids.to(topk_ids.dtype), weights

    @property
    def decode_dtype(self) -> torch.dtype | None:
        """The dtype decode steps run in (None before ``attach``)."""
        return None if self._decode_net is None else self._decode_net.compress.weight.dtype

    def close(self) -> None:
        self._forget_decoders()
        self._engine = None
        self._reset_sequence()

    # ------------------------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, float]:
        """Over the decode tokens scored so far: ``hit_rate`` (routed experts that were predicted /
        routed experts), ``precision`` (predicted-and-routed / predicted), ``scored_experts``."""
        engine = self._engine
        if engine is None or engine.cache is None:
            return {"hit_rate": 0.0, "precision": 0.0, "scored_experts": 0.0}
        engine.wait_deferred(10.0)
        s = engine.feed.stats()
        hits, needed, predicted = s["predicted_hits"], s["predicted_needed"], s["predicted_experts"]
        return {
            "hit_rate": hits / needed if needed else 0.0,
            "precision": hits / predicted if predicted else 0.0,
            "scored_experts": float(needed),
        }

    def reset_metrics(self) -> None:
        return None  # the counts live in the cache: engine.reset_stats zeroes them

    # ------------------------------------------------------------------------------ internals
    def _require_engine(self) -> OffloadEngine:
        if self._engine is None:
            raise RuntimeError("SidaPrefetcher used before attach()")
        return self._engine

    def _reset_sequence(self) -> None:
        self._fresh = True
        self._batch: int | None = None
        self._seen = 0
        self._decoder: GraphedDecoder | None = None  # holds the sequence's state, else _state
        self._state: PredictorState | None = None
        self._logits: torch.Tensor | None = None  # [L, T, E] of the forward being run
        self._rows: torch.Tensor | None = None  # [L, T * k] ids of the last predict_ahead
        self._ahead = False

    def _predict_prompt(self, engine: OffloadEngine, x: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        batch, seq = x.shape[:2]
        mask = None
        if attention_mask is not None:  # the prompt's columns: the first of a static mask, else the last
            mask = attention_mask[..., :seq] if self._static_mask else attention_mask[..., -seq:]
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: the unmasked path
        with torch.inference_mode():
            logits, state = self.predictor(x.detach().float(), None, mask)  # [L, B, S, E]
            ids = logits.topk(self.k, dim=-1).indices
        L, E = logits.shape[0], logits.shape[-1]
        self._logits = logits.reshape(L, batch * seq, E)
        self._fresh, self._batch, self._ahead = False, batch, False
        self._rows = None
        capacity, self._next_capacity = self._next_capacity or DEFAULT_CAPACITY, None
        decoder = self._decoder_for(batch, capacity)
        self._join_sides(decoder)  # the last sequence's final prediction may still be running
        self._decoder = decoder if decoder.load(state) else None
        self._state = None if self._decoder is not None else state
        # the prompt's rows feed the policy and prefetch, unscored; the prediction the last sequence
        # left unused (the greedy loop predicts one token past its end) is forgotten
        engine.prefetch_deferred(ids.reshape(L, -1).contiguous(), self._layers, generation=engine.generation,
                                 future=self.feed_future, forget=True)

    def _predict_token(self, x: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        """One decode token's prediction ``[L, B * k]`` (``x``: ``[B, 1, H]``); sets ``_logits``."""
        decoder = self._decoder
        if decoder is not None:
            self._join_sides(decoder)  # replayed steps' predictions ran on the side streams
        if decoder is not None and decoder.full:  # on in the eager forward, in the predictor's dtype
            state = decoder.to_state(self.predictor.compress.weight.dtype)
            self._state, self._decoder, decoder = state, None, None
        with torch.inference_mode():
            if decoder is not None:
                logits, ids = decoder.step(x.detach(), compiled=compiled)
            else:
                if self._state is None:
                    raise RuntimeError("SidaPrefetcher: a decode token before any prompt of its sequence")
                logits, self._state = self.predictor(x.detach().float(), self._state)
                ids = logits.topk(self.k, dim=-1).indices
        L, E = logits.shape[0], logits.shape[-1]
        self._logits = logits.reshape(L, -1, E)
        return ids.reshape(L, -1)

    def _decoder_for(self, batch: int, capacity: int) -> GraphedDecoder:
        """The decoder of ``batch`` rows and ``capacity`` tokens, made with its side steps on
        CUDA. One dropped from the newest few is found again while a captured decode step still
        holds one of its side steps: that step's graph stages into that side step, whose
        launches step that decoder."""
        if self._decode_net is None:
            raise RuntimeError("SidaPrefetcher used before attach()")
        key = (batch, capacity)
        decoder = self._decoders.get(key) or self._dropped.get(key)
        if decoder is None:
            decoder = GraphedDecoder(self._decode_net, batch, capacity, k=self.k)
        if decoder.device.type == "cuda":
            for compiled in (False, True):
                if (key, compiled) not in self._sides:
                    self._sides[key, compiled] = (self._dropped_sides.get((key, compiled))
                                                  or SideStep(decoder, compiled, wait_for_prediction=self.hash_routing))
        self._decoders.pop(key, None)
        self._decoders[key] = decoder  # the newest use last
        while len(self._decoders) > MAX_DECODERS:  # calls of many shapes: keep the newest few
            old = next(iter(self._decoders))
            self._dropped[old] = self._decoders.pop(old)
            for compiled in (False, True):
                side = self._sides.pop((old, compiled), None)
                if side is not None:
                    self._dropped_sides[old, compiled] = side
        return decoder

    def _forget_decoders(self) -> None:
        self._decoders: dict[tuple[int, int], GraphedDecoder] = {}  # (batch, capacity), oldest use first
        self._sides: dict[tuple[tuple[int, int], bool], SideStep] = {}  # theirs on CUDA, by compiled or not
        # dropped ones, alive while a captured decode step holds a side step of theirs
        self._dropped: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._dropped_sides: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def _key_of(self, decoder: GraphedDecoder) -> tuple[int, int]:
        return decoder.batch, decoder.max_len

    def _join_sides(self, decoder: GraphedDecoder) -> None:
        """The current stream waits for ``decoder``'s side steps, before it writes the decoder."""
        for compiled in (False, True):
            side = self._sides.get((self._key_of(decoder), compiled))
            if side is not None:
                side.join()

    def _submit(self, engine: OffloadEngine, rows: torch.Tensor, late: bool = False) -> None:
        """Hand a decode prediction to the cache. ``late``: it reaches the cache after the step it
        names was launched (a replayed step's), so an own-token prediction only feeds the policy
        and the scores; a next-token one (target_shift=1) names the step after that one
        (``after_next``), which its copies can still reach."""
        shifted = bool(self.predictor.config.target_shift)
        engine.prefetch_deferred(rows, self._layers, generation=engine.generation, future=self.feed_future,
                                 remember=True, feed_only=not self.prefetch or (late and not shifted),
                                 after_next=shifted)


def load_prefetcher(path: str | os.PathLike, **kwargs) -> SidaPrefetcher:
    """A :class:`SidaPrefetcher` for the predictor saved in ``path`` (``predictor.json`` +
    ``predictor.safetensors``, e.g. in the model's directory); ``kwargs`` go to the constructor."""
    return SidaPrefetcher(HashPredictor.load(path), **kwargs)


__all__ = ["SidaPrefetcher", "load_prefetcher"]
