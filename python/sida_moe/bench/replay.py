"""Routing replay: a model's MoE layers route as a trained model recorded, not as their routers do.

Random weights route near uniformly, with none of a trained router's locality, so cache hit rates
and miss bytes of a random-weight preset say little. A routing trace (written by
``benches/record_routing_trace.py``: a trained model's top-k expert ids for each token of held-out text
and each MoE layer) replaces every layer's top-k ids instead.

Trace file (``.npz``):

- ``topk_ids``: uint8 ``[tokens, layers, k]``; row t is token t of the recorded text (each run of
  ``seq_len`` rows is one teacher-forced sequence);
- ``metadata``: a JSON string with ``format`` (``"sida-moe-routing-trace"``), ``version`` (1),
  ``num_experts``, ``top_k``, ``layers``, ``tokens``, ``seq_len`` and ``source`` (model and text).

Mapping of a model's L MoE layers onto a trace of L_t layers (``layer_map``):

- layer ``l`` replays trace layer ``l * L_t // L``: depth is kept (the first layers of the big
  model route like the first recorded ones). The layers sharing a trace layer are its copies
  ``c = 0, 1, ...`` in layer order; ``C`` is the most copies of any trace layer;
- batch row ``b`` of copy ``c`` reads token ``(pos + s + (b * C + c) * tokens // (B * C)) mod
  tokens`` for its ``s``-th token of the forward: the ``B * C`` streams start evenly spread over
  the trace. Layers sharing a trace layer therefore route like different text (six adjacent layers
  with identical routing would hit and miss in lockstep), and so do the rows of a batch; the layers
  of one copy (``c``, ``c + C``, ... when L is a multiple of L_t) replay one recorded token through
  every recorded layer, keeping a trained router's correlation across depth;
- ``pos`` is a device counter of the tokens each row has consumed: every forward of S tokens per
  row reads positions ``pos .. pos + S - 1`` and advances it by S (a prefill consumes its prompt).

The routers still run; their top-k weights are kept, only the ids are replaced: those weights are
what the block would scale the experts by (descending, normalised as the family does), and keeping
them adds no kernel. The experts' numbers are random either way: only which experts run matters.

Inside a captured CUDA graph: the hooks only launch kernels on device tensors (the counter is read
and advanced on the device, the trace is indexed on the device), so each replay of a captured
decode step consumes the next position without the host.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

FORMAT = "sida-moe-routing-trace"
VERSION = 1
_META_INTS = ("num_experts", "top_k", "layers", "tokens", "seq_len")


class RoutingTraceError(ValueError):
    """A routing trace file that cannot be replayed; the message names the file and what is wrong."""


@dataclass
class RoutingTrace:
    topk_ids: np.ndarray  # uint8 [tokens, layers, k]
    metadata: dict
    path: str

    @property
    def tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def layers(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[2]

    @property
    def num_experts(self) -> int:
        return int(self.metadata["num_experts"])


def save_routing_trace(path: str, topk_ids: np.ndarray, metadata: dict) -> dict:
    """Write ``topk_ids [tokens, layers, k]`` (ids < 256) and ``metadata`` (its format, version and
    shape fields are filled in here). Returns the metadata written."""
    ids = np.asarray(topk_ids)
    if ids.ndim != 3:
        raise ValueError(f"topk_ids must be [tokens, layers, k], got shape {ids.shape}")
    num_experts = int(metadata["num_experts"])
    if not 1 <= num_experts <= 256 or (ids.size and (ids.min() < 0 or ids.max() >= num_experts)):
        raise ValueError(f"expert ids must lie in 0..{num_experts - 1} and fit uint8 (at most 256 experts)")
    meta = {"format": FORMAT, "version": VERSION, **metadata,
            "tokens": ids.shape[0], "layers": ids.shape[1], "top_k": ids.shape[2]}
    np.savez_compressed(path, topk_ids=ids.astype(np.uint8), metadata=np.array(json.dumps(meta)))
    return meta


def load_routing_trace(path: str) -> RoutingTrace:
    """Read and check a trace file; anything wrong raises RoutingTraceError naming the file."""

    def bad(what: str) -> RoutingTraceError:
        return RoutingTraceError(f"{path}: {what}")

    if not os.path.isfile(path):
        raise bad("no such routing trace file")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:  # not a zip, truncated, or object arrays
        raise bad(f"not a routing trace (.npz written by benches/record_routing_trace.py): {e}") from None
    missing = [k for k in ("topk_ids", "metadata") if k not in arrays]
    if missing:
        raise bad(f"not a routing trace: no {' or '.join(repr(k) for k in missing)} array")
    try:
        meta = json.loads(str(arrays["metadata"]))
    except json.JSONDecodeError as e:
        raise bad(f"metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise bad(f"metadata format is {meta.get('format') if isinstance(meta, dict) else meta!r:.60}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise bad(f"routing trace version {meta.get('version')!r} is not supported (expected {VERSION})")
    wrong = [k for k in _META_INTS if isinstance(meta.get(k), bool) or not isinstance(meta.get(k), int) or meta[k] < 1]
    if wrong:
        raise bad("metadata needs positive ints " + ", ".join(f"{k}={meta.get(k)!r}" for k in wrong))
    ids = arrays["topk_ids"]
    if ids.dtype != np.uint8 or ids.ndim != 3:
        raise bad(f"topk_ids must be uint8 [tokens, layers, k], got {ids.dtype} of shape {ids.shape}")
    if ids.shape != (meta["tokens"], meta["layers"], meta["top_k"]):
        raise bad(f"topk_ids has shape {ids.shape} but the metadata says tokens={meta['tokens']}, "
                  f"layers={meta['layers']}, top_k={meta['top_k']}")
    if int(ids.max()) >= meta["num_experts"]:
        raise bad(f"expert id {int(ids.max())} out of range for num_experts={meta['num_experts']}")
    s = np.sort(ids, axis=2)
    if (s[..., 1:] == s[..., :-1]).any():
        raise bad("a token's top-k ids repeat an expert (a router picks k distinct experts)")
    return RoutingTrace(ids, meta, path)


def layer_map(num_layers: int, trace_layers: int) -> list[tuple[int, int]]:
    """(trace layer, copy) of each of ``num_layers`` model MoE layers (module docstring)."""
    out, seen = [], {}
    for layer in range(num_layers):
        t = layer * trace_layers // num_layers
        out.append((t, seen.get(t, 0)))
        seen[t] = seen.get(t, 0) + 1
    return out


def decode_visits(trace: RoutingTrace, num_layers: int, batch: int, steps: int, start: int = 0) -> list[tuple[int, list[int]]]:
    """The cache's visits of ``steps`` replayed decode steps of ``batch`` rows, computed on the
    host: ``(layer, distinct experts)`` per MoE layer per step, the union of the rows' ids, with
    the mapping of the module docstring from position ``start``. For policy studies without a
    model (``simulate_policy``); ``ReplayRouting`` gives a model the same ids."""
    mapping = layer_map(num_layers, trace.layers)
    copies = max(c for _, c in mapping) + 1
    offsets = np.arange(batch)[:, None] * copies + np.arange(copies)[None, :]  # [B, C]
    offsets = offsets * trace.tokens // (batch * copies)
    out = []
    for s in range(steps):
        rows = (start + s + offsets) % trace.tokens
        for layer, (t, c) in enumerate(mapping):
            out.append((layer, np.unique(trace.topk_ids[rows[:, c], t]).tolist()))
    return out


class ReplayRouting:
    """Forward pre-hooks on a model's MoE blocks: every experts module gets the trace's ids
    (mapping in the module docstring). ``position`` ([1] int64 on the model's device) counts the
    tokens each row has consumed; ``reset(p)`` sets it (a device fill, no sync); ``remove()`` takes
    the hooks off."""

    def __init__(self, model: torch.nn.Module, trace: RoutingTrace, device: torch.device | None = None) -> None:
        from sida_moe.adapters import decoder_moe_layers

        layers = decoder_moe_layers(model)
        shapes = {(l.num_experts, l.top_k) for l in layers}
        if shapes != {(trace.num_experts, trace.top_k)}:
            got = ", ".join(f"{e} experts top-{k}" for e, k in sorted(shapes))
            raise RoutingTraceError(f"{trace.path}: recorded with {trace.num_experts} experts top-{trace.top_k}, but "
                                    f"the model's MoE layers have {got}: replay needs the same experts count and top-k")
        device = torch.device(device) if device is not None else next(model.parameters()).device
        self.trace = trace
        self.tokens = trace.tokens
        self.layer_map = layer_map(len(layers), trace.layers)
        self.copies = max(c for _, c in self.layer_map) + 1
        with torch.inference_mode(False):  # written by forwards in and out of inference mode
            # [trace layer, token, k] int64: index_select rows of one layer, no cast per forward
            self.ids = torch.from_numpy(trace.topk_ids.astype(np.int64)).to(device).permute(1, 0, 2).contiguous()
            self.position = torch.zeros(1, dtype=torch.long, device=device)
        self._relative: dict[tuple[int, int], torch.Tensor] = {}
        self._shape: tuple[int, int] | None = None
        self._index: torch.Tensor | None = None  # [copies, B*S] trace rows of this forward
        # plain ints and tensor ops only in the hooks: torch.compile traces them into its graph (a
        # graph break inside a decoder layer would make it compile every layer apart)
        self.top_k = trace.top_k
        self._handles = [layers[0].block.register_forward_pre_hook(self._begin, with_kwargs=True)]
        for layer, (t, c) in zip(layers, self.layer_map):
            self._handles.append(layer.experts.register_forward_pre_hook(self._route(t, c)))

    def reset(self, position: int = 0) -> None:
        self.position.fill_(position)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def relative(self, batch: int, seq: int) -> torch.Tensor:
        """``[copies, batch * seq]``: trace offset of each (copy, row b, token s) from ``pos``."""
        if torch.compiler.is_compiling():
            return self._offsets(batch, seq)  # traced into the compiled graph: no memo
        rel = self._relative.get((batch, seq))
        if rel is None:
            with torch.inference_mode(False):
                rel = self._offsets(batch, seq)
            dev = self.position.device
            if not (dev.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                # made while capturing, it would live in the graph's pool: kept only as that graph's kernels
                self._relative[(batch, seq)] = rel
        return rel

    def _offsets(self, batch: int, seq: int) -> torch.Tensor:
        dev = self.position.device
        b = torch.arange(batch, device=dev).view(1, batch, 1)
        c = torch.arange(self.copies, device=dev).view(-1, 1, 1)
        s = torch.arange(seq, device=dev).view(1, 1, seq)
        return (s + (b * self.copies + c) * self.tokens // (batch * self.copies)).reshape(self.copies, -1)

    def _begin(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            raise RuntimeError("routing replay: the first MoE block was called without hidden_states")
        batch, seq = (hidden.shape[0], hidden.shape[1]) if hidden.dim() == 3 else (1, hidden.shape[0])
        self._shape = (batch, seq)
        self._index = torch.remainder(self.position + self.relative(batch, seq), self.tokens)
        self.position.add_(seq)  # after the read above, in stream order
        return None

    def _route(self, trace_layer: int, copy: int):
        def hook(module, args):
            if len(args) < 3 or self._index is None:
                raise RuntimeError("routing replay: an experts module was called without positional "
                                   "(hidden, top_k_index, top_k_weights), or before its MoE block")
            hidden, ids, weights = args[:3]
            batch, seq = self._shape
            if ids.shape != (batch * seq, self.top_k):
                raise RuntimeError(f"routing replay: top_k_index of shape {tuple(ids.shape)} for a forward of "
                                   f"{batch} x {seq} tokens, top-{self.top_k}")
            replayed = self.ids[trace_layer].index_select(0, self._index[copy])
            return (hidden, replayed if replayed.dtype == ids.dtype else replayed.to(ids.dtype), weights, *args[3:])

        return hook
