"""Routing traces: which experts each MoE layer chose for each token of a text corpus.

A trace directory holds
- ``manifest.json``: model facts (hidden size, MoE layers, experts, top-k), ``top_t``, sequence
  length and the list of shards;
- ``shard-XXXXX.safetensors``: ``input_ids [n, S] int32`` (the layer-0 input: token ids; the
  embeddings are recomputed from them), ``topk_ids [L, n, S, k] int16`` (the experts the model
  used), ``logit_ids [L, n, S, T] int16`` and ``logit_vals [L, n, S, T] float16`` (the router's T
  largest logits, descending: enough for truncated distillation, far smaller than all E);
- optionally (``next_layer_gate`` in the manifest) ``gate_ids / gate_vals [L-1, n, S, T]``: for MoE
  layer l >= 1, the T largest logits of layer l's router applied to layer l-1's MoE input -- what
  the run-ahead prefetcher's correction sees once layer l-1 has run (the fused variant learns how
  much to trust it next to the predictor);
- optionally (``moe_inputs_every`` in the manifest) ``moe_inputs [L-1, r, S, d] float16`` and
  ``moe_input_rows [r] int32``: for every ``moe_inputs_every``-th sequence (``moe_input_rows``: its
  row in the shard), MoE layers 0..L-2's router inputs -- the hidden state the lookahead heads read
  to correct layer l+1's prediction once layer l has run (``sida_moe.train.lookahead``). About
  ``2 d (L-1)`` bytes per token: a share of the corpus is enough to train those small heads;
- ``embeddings.safetensors``: ``weight [V, d]``, the model's input-embedding output for every
  token id (includes any embedding scale), so training needs no model.

Routing is captured with forward hooks: the router's output gives the logits, the experts
module's input gives the top-k ids the model really used (transformers >= 5 calls
``experts(hidden, top_k_index, top_k_weights)`` in every MoE family; the family adapter's
``read_routing`` turns them into ids). The MoE layers are ``sida_moe.adapters.decoder_moe_layers``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from sida_moe.adapters import Adapter, MoELayer, decoder_moe_layers

MANIFEST_NAME = "manifest.json"
EMBEDDINGS_NAME = "embeddings.safetensors"
TRACE_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------ routing hooks
def router_logits(output: object, layer: int) -> torch.Tensor:
    """The logits in a router module's output (the output itself, or its first element)."""
    logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"router of MoE layer {layer} returned {type(output).__name__}; expected logits first")
    return logits


class RoutingRecorder:
    """Context manager recording each MoE layer's router logits ``[T, E]`` and top-k ids ``[T, k]``
    for every forward while active. ``clear()`` drops what was recorded.

    ``next_layer_gate``: also record, for each layer l >= 1, layer l's router applied to layer l-1's
    router input (``gate_logits[l]``; called through ``forward`` so no hook sees it).
    ``router_inputs``: also keep MoE layers 0..L-2's router inputs (``inputs[l]``, ``[T, d]``)."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[MoELayer] | None = None,
        keep_logits: bool = True,
        next_layer_gate: bool = False,
        router_inputs: bool = False,
    ) -> None:
        self.layers = list(layers) if layers is not None else decoder_moe_layers(model)
        self.keep_logits = keep_logits
        self.next_layer_gate = next_layer_gate
        self.router_inputs = router_inputs
        self.inputs: list[list[torch.Tensor]] = [[] for _ in self.layers]  # the last layer stays empty
        self.logits: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.topk_ids: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.gate_logits: list[list[torch.Tensor]] = [[] for _ in self.layers]  # layer 0 stays empty
        self._handles: list = []

    def clear(self) -> None:
        for lst in (*self.logits, *self.topk_ids, *self.gate_logits, *self.inputs):
            lst.clear()

    def __enter__(self) -> RoutingRecorder:
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.router.register_forward_hook(self._router_hook(i)))
            self._handles.append(layer.experts.register_forward_pre_hook(self._experts_hook(i, layer.adapter)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _router_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            logits = router_logits(output, i)
            if self.keep_logits:
                self.logits[i].append(logits.detach().reshape(-1, logits.shape[-1]))
            if self.next_layer_gate and i + 1 < len(self.layers) and args:
                nxt = router_logits(self.layers[i + 1].router.forward(args[0]), i + 1)
                self.gate_logits[i + 1].append(nxt.detach().reshape(-1, nxt.shape[-1]))
            if self.router_inputs and i + 1 < len(self.layers) and args:
                self.inputs[i].append(args[0].detach().reshape(-1, args[0].shape[-1]))

        return hook

    def _experts_hook(self, i: int, adapter: Adapter):
        def hook(module: nn.Module, args: tuple) -> None:
            if len(args) >= 3:  # else layer_topk falls back to the top-k of the router's logits
                ids, _ = adapter.read_routing(args[1], args[2])
                self.topk_ids[i].append(ids.detach().reshape(-1, ids.shape[-1]))

        return hook

    def layer_topk(self, i: int) -> torch.Tensor:
        """All recorded top-k ids of MoE layer ``i`` concatenated: ``[T_total, k]``. Falls back to the
        top-k of the recorded logits when the experts module did not receive ids."""
        if self.topk_ids[i]:
            return torch.cat(self.topk_ids[i])
        if not self.logits[i]:
            raise RuntimeError(f"nothing recorded for MoE layer {i}: was a forward run inside the recorder?")
        return torch.cat(self.logits[i]).topk(self.layers[i].top_k, dim=-1).indices

    def layer_logits(self, i: int) -> torch.Tensor:
        if not self.logits[i]:
            raise RuntimeError(f"no router logits recorded for MoE layer {i}")
        return torch.cat(self.logits[i])

    def layer_gate_logits(self, i: int) -> torch.Tensor:
        """Layer ``i``'s router on layer ``i-1``'s router input, ``[T_total, E]`` (``next_layer_gate``)."""
        if not self.gate_logits[i]:
            raise RuntimeError(f"no next-layer gate logits recorded for MoE layer {i} (layer >= 1, next_layer_gate=True)")
        return torch.cat(self.gate_logits[i])

    def layer_inputs(self, i: int) -> torch.Tensor:
        """MoE layer ``i``'s router inputs ``[T_total, d]`` (``router_inputs``; layers 0..L-2)."""
        if not self.inputs[i]:
            raise RuntimeError(f"no router inputs recorded for MoE layer {i} (layer < L-1, router_inputs=True)")
        return torch.cat(self.inputs[i])


# ------------------------------------------------------------------------------------ corpus
def read_corpus(path: str | os.PathLike, suffixes: Sequence[str] = (".py", ".txt", ".md", ".rst")) -> list[tuple[str, str]]:
    """``(relative path, text)`` of a text file, or of every file under a directory whose name ends
    with one of ``suffixes``, sorted by path. Undecodable bytes are replaced."""
    path = os.fspath(path)
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            return [(os.path.basename(path), f.read())]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"corpus path {path!r} is neither a file nor a directory")
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(tuple(suffixes)):
                full = os.path.join(root, name)
                with open(full, encoding="utf-8", errors="replace") as f:
                    out.append((os.path.relpath(full, path), f.read()))
    if not out:
        raise ValueError(f"no files ending in {tuple(suffixes)} under {path!r}")
    return out


def split_held_out(docs: Sequence[tuple[str, str]], held_out_fraction: float = 0.1) -> tuple[list, list]:
    """Deterministic split by document path (a stable hash), so held-out text is whole unseen files."""
    import zlib

    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    train, held = [], []
    for doc in docs:
        bucket = zlib.crc32(doc[0].encode()) % 1000
        (held if bucket < held_out_fraction * 1000 else train).append(doc)
    return train, held


def chunk_token_ids(token_streams: Iterable[Sequence[int]], seq_len: int, separator: int | None = None) -> torch.Tensor:
    """Concatenate token streams (``separator`` between them) and cut ``[N, seq_len]`` int64 rows;
    the ragged tail is dropped."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    flat: list[int] = []
    for ids in token_streams:
        flat.extend(int(t) for t in ids)
        if separator is not None:
            flat.append(int(separator))
    n = len(flat) // seq_len
    if n == 0:
        raise ValueError(f"corpus has {len(flat)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(flat[: n * seq_len], dtype=torch.int64).view(n, seq_len)


# ------------------------------------------------------------------------------------ writing
def _embedding_table(model: nn.Module, chunk: int = 8192) -> torch.Tensor:
    emb = model.get_input_embeddings()
    vocab = emb.weight.shape[0] if hasattr(emb, "weight") else getattr(emb, "num_embeddings")
    dev = emb.weight.device if hasattr(emb, "weight") else torch.device("cpu")
    with torch.no_grad():
        parts = [emb(torch.arange(s, min(s + chunk, vocab), device=dev)).cpu() for s in range(0, vocab, chunk)]
    return torch.cat(parts).contiguous()


def record_traces(
    model: nn.Module,
    sequences: torch.Tensor,
    out_dir: str | os.PathLike,
    batch_size: int = 8,
    top_t: int = 30,
    shard_sequences: int = 1024,
    model_name_or_path: str = "",
    progress: bool = True,
    next_layer_gate: bool = True,
    moe_inputs_every: int = 0,
) -> dict:
    """Run ``model`` over ``sequences`` (``[N, S]`` token ids) and write a trace directory.

    ``top_t``: router logits kept per token and layer (capped at the number of experts).
    ``next_layer_gate``: also record each layer's router on the previous layer's input (module
    docstring; one small matmul per layer). ``moe_inputs_every``: also keep the router inputs of
    every that many-th sequence (0: none; 1: all), for the lookahead heads. Returns the manifest. The model is run in eval mode under ``torch.no_grad`` on its own device.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if sequences.dim() != 2 or sequences.is_floating_point():
        raise ValueError(f"sequences must be a 2-D integer tensor [N, S], got {sequences.dtype} {tuple(sequences.shape)}")
    if batch_size <= 0 or shard_sequences <= 0 or top_t <= 0:
        raise ValueError("batch_size, shard_sequences and top_t must be positive")
    if isinstance(moe_inputs_every, bool) or not isinstance(moe_inputs_every, int) or moe_inputs_every < 0:
        raise ValueError(f"moe_inputs_every must be an int >= 0 (0: off, 1: every sequence), got {moe_inputs_every!r}")
    layers = decoder_moe_layers(model)
    num_experts = layers[0].num_experts
    top_k = layers[0].top_k
    if any(l.num_experts != num_experts or l.top_k != top_k for l in layers):
        raise ValueError("traces need the same number of experts and top-k in every MoE layer")
    if num_experts > 32767:
        raise ValueError(f"{num_experts} experts do not fit the int16 expert ids of the trace format")
    top_t = min(top_t, num_experts)
    os.makedirs(out_dir, exist_ok=True)
    device = next(model.parameters()).device
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config

    save_file({"weight": _embedding_table(model)}, os.path.join(out_dir, EMBEDDINGS_NAME))
    shards: list[dict] = []
    gate = next_layer_gate and len(layers) > 1
    inputs_every = moe_inputs_every if len(layers) > 1 else 0
    buf: dict[str, list[torch.Tensor]] = {"input_ids": [], "topk_ids": [], "logit_ids": [], "logit_vals": [],
                                          "gate_ids": [], "gate_vals": [], "moe_inputs": [], "moe_input_rows": []}

    def flush() -> None:
        if not buf["input_ids"]:
            return
        tensors = {
            "input_ids": torch.cat(buf["input_ids"]).to(torch.int32),
            "topk_ids": torch.cat(buf["topk_ids"], dim=1).to(torch.int16),
            "logit_ids": torch.cat(buf["logit_ids"], dim=1).to(torch.int16),
            "logit_vals": torch.cat(buf["logit_vals"], dim=1).to(torch.float16),
        }
        if gate:
            tensors["gate_ids"] = torch.cat(buf["gate_ids"], dim=1).to(torch.int16)
            tensors["gate_vals"] = torch.cat(buf["gate_vals"], dim=1).to(torch.float16)
        if inputs_every:
            hidden = int(getattr(config, "hidden_size"))
            rows = torch.cat(buf["moe_input_rows"]) if buf["moe_input_rows"] else torch.zeros(0, dtype=torch.int64)
            tensors["moe_input_rows"] = (rows - shard_start[0]).to(torch.int32)  # row within this shard
            tensors["moe_inputs"] = (torch.cat(buf["moe_inputs"], dim=1) if buf["moe_inputs"]
                                     else torch.zeros(len(layers) - 1, 0, seq_len, hidden)).to(torch.float16)
        shard_start[0] += int(tensors["input_ids"].shape[0])
        fname = f"shard-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, fname))
        shards.append({"file": fname, "num_sequences": int(tensors["input_ids"].shape[0])})
        for v in buf.values():
            v.clear()

    was_training = model.training
    model.eval()
    n, seq_len = sequences.shape
    pending = 0
    shard_start = [0]  # first sequence of the shard being filled
    try:
        with RoutingRecorder(model, layers, next_layer_gate=gate, router_inputs=bool(inputs_every)) as rec, \
                torch.no_grad():
            for start in tqdm(range(0, n, batch_size), desc="trace", unit="batch", disable=not progress):
                batch = sequences[start : start + batch_size]
                rec.clear()
                model(input_ids=batch.to(device), use_cache=False)
                b = batch.shape[0]
                ids, lids, lvals = [], [], []
                for i in range(len(layers)):
                    ids.append(rec.layer_topk(i).view(b, seq_len, top_k).cpu())
                    vals, idx = rec.layer_logits(i).float().topk(top_t, dim=-1)
                    lids.append(idx.view(b, seq_len, top_t).cpu())
                    lvals.append(vals.view(b, seq_len, top_t).cpu())
                buf["input_ids"].append(batch.cpu())
                buf["topk_ids"].append(torch.stack(ids))
                buf["logit_ids"].append(torch.stack(lids))
                buf["logit_vals"].append(torch.stack(lvals))
                if gate:
                    top = [rec.layer_gate_logits(i).float().topk(top_t, dim=-1) for i in range(1, len(layers))]
                    buf["gate_ids"].append(torch.stack([t.indices.view(b, seq_len, top_t).cpu() for t in top]))
                    buf["gate_vals"].append(torch.stack([t.values.view(b, seq_len, top_t).cpu() for t in top]))
                if inputs_every:
                    keep = [j for j in range(b) if (start + j) % inputs_every == 0]
                    if keep:
                        sel = torch.tensor(keep, device=device)
                        buf["moe_inputs"].append(torch.stack([
                            rec.layer_inputs(i).view(b, seq_len, -1).index_select(0, sel).to(torch.float16).cpu()
                            for i in range(len(layers) - 1)]))
                        buf["moe_input_rows"].append(torch.tensor(keep, dtype=torch.int64) + start)
                pending += b
                if pending >= shard_sequences:
                    flush()
                    pending = 0
            flush()
    finally:
        model.train(was_training)

    manifest = {
        "format_version": TRACE_FORMAT_VERSION,
        "model_type": getattr(config, "model_type", ""),
        "model_name_or_path": model_name_or_path,
        "hidden_size": int(getattr(config, "hidden_size")),
        "num_moe_layers": len(layers),
        "moe_layer_ids": [l.decoder_layer for l in layers],
        "num_experts": num_experts,
        "top_k": top_k,
        "top_t": top_t,
        "next_layer_gate": gate,
        "moe_inputs_every": inputs_every,
        "seq_len": int(seq_len),
        "num_sequences": int(n),
        "shards": shards,
    }
    with open(os.path.join(out_dir, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


__all__ = [
    "RoutingRecorder",
    "chunk_token_ids",
    "read_corpus",
    "record_traces",
    "router_logits",
    "split_held_out",
]
