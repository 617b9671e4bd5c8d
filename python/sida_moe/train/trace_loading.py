"""Reading routing traces (the format is ``traces``' docstring): the manifest, the shards, and
``load_traces``, which gathers one or more trace directories of the same model into ``Traces``
for training."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from sida_moe.train.traces import EMBEDDINGS_NAME, MANIFEST_NAME, TRACE_FORMAT_VERSION

@dataclass
class Traces:
    """A loaded trace directory, all shards concatenated (CPU tensors)."""

    manifest: dict
    # int64 ids and float32 logits, or the on-disk int32 / int16 / float16 with load_traces(compact=True)
    input_ids: torch.Tensor  # [N, S] int64
    topk_ids: torch.Tensor  # [L, N, S, k] int64
    logit_ids: torch.Tensor  # [L, N, S, T] int64
    logit_vals: torch.Tensor  # [L, N, S, T] float32
    embeddings: torch.Tensor  # [V, d]
    gate_ids: torch.Tensor | None = None  # [L-1, N, S, T] int64: layer l's router on layer l-1's input
    gate_vals: torch.Tensor | None = None  # [L-1, N, S, T] float32
    moe_inputs: torch.Tensor | None = None  # [L-1, R, S, d] float16: router inputs of R of the sequences
    moe_input_rows: torch.Tensor | None = None  # [R] int64: the sequence (row of input_ids) of each

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, rows: torch.Tensor | slice) -> Traces:
        """The sequences ``rows`` (a slice or index tensor), with the router inputs of those that have them."""
        moe_inputs = moe_input_rows = None
        if self.moe_inputs is not None:
            picked = torch.arange(self.num_sequences)[rows]
            where = torch.full((self.num_sequences,), -1, dtype=torch.int64)  # trace row -> subset row
            where[picked] = torch.arange(picked.numel())
            new_rows = where[self.moe_input_rows]
            kept = new_rows >= 0
            moe_inputs, moe_input_rows = self.moe_inputs[:, kept], new_rows[kept]
        return Traces(
            self.manifest,
            self.input_ids[rows],
            self.topk_ids[:, rows],
            self.logit_ids[:, rows],
            self.logit_vals[:, rows],
            self.embeddings,
            None if self.gate_ids is None else self.gate_ids[:, rows],
            None if self.gate_vals is None else self.gate_vals[:, rows],
            moe_inputs,
            moe_input_rows,
        )

    def with_moe_inputs(self) -> Traces:
        """Only the sequences recorded with their router inputs, in the order of ``moe_inputs`` (so
        sequence i's inputs are ``moe_inputs[:, i]``). Raises ``ValueError`` when there are none."""
        if self.moe_inputs is None or self.moe_input_rows.numel() == 0:
            raise ValueError("the trace holds no router inputs (record it with moe_inputs_every > 0, "
                             "`sida-moe trace --moe-inputs-every N`)")
        # subset the other tensors only: the inputs are already in this order (no copy of them)
        out = replace(self, moe_inputs=None, moe_input_rows=None).subset(self.moe_input_rows)
        out.moe_inputs, out.moe_input_rows = self.moe_inputs, torch.arange(self.moe_input_rows.numel())
        return out


def iter_shards(trace_dir: str | os.PathLike) -> Iterator[dict[str, torch.Tensor]]:
    """The raw tensors of each shard, in order."""
    manifest = read_manifest(trace_dir)
    for shard in manifest["shards"]:
        yield _load_trace_file(os.path.join(trace_dir, shard["file"]))


def _load_trace_file(path: str) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``; a missing or corrupt file raises naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from sida_moe._native import LoadError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"trace file {path!r} is missing (named by {MANIFEST_NAME} of its directory)")
    try:
        return load_file(path)
    except SafetensorError as e:
        raise LoadError(f"{path}: not a valid safetensors file: {e}") from None


# manifest entries every reader relies on (ints)
_MANIFEST_INTS = ("hidden_size", "num_moe_layers", "num_experts", "top_k", "top_t", "seq_len", "num_sequences")


def read_manifest(trace_dir: str | os.PathLike) -> dict:
    """The manifest of a trace directory; a malformed one raises LoadError naming the file and
    what is wrong with it."""
    from sida_moe._native import LoadError

    path = os.path.join(trace_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{trace_dir!r} is not a trace directory: no {MANIFEST_NAME}")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: not a valid trace manifest (invalid JSON: {e})") from None
    if not isinstance(manifest, dict):
        raise LoadError(f"{path}: not a valid trace manifest (a JSON object is expected, got {type(manifest).__name__})")
    if manifest.get("format_version") != TRACE_FORMAT_VERSION:
        raise ValueError(
            f"{path}: trace format version {manifest.get('format_version')!r} is not supported (expected {TRACE_FORMAT_VERSION})"
        )
    bad = [k for k in _MANIFEST_INTS
           if isinstance(manifest.get(k), bool) or not isinstance(manifest.get(k), int) or manifest[k] < (k != "num_sequences")]
    if bad:
        raise LoadError(f"{path}: not a valid trace manifest: {', '.join(f'{k}={manifest.get(k)!r}' for k in bad)} "
                        f"(each must be an int >= 1; num_sequences >= 0)")
    layer_ids = manifest.get("moe_layer_ids")
    if not isinstance(layer_ids, list) or len(layer_ids) != manifest["num_moe_layers"] or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in layer_ids):
        raise LoadError(f"{path}: not a valid trace manifest: moe_layer_ids must list num_moe_layers "
                        f"({manifest['num_moe_layers']}) ints, got {layer_ids!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(sh, dict) and isinstance(sh.get("file"), str) and sh["file"]
            and os.path.basename(sh["file"]) == sh["file"] for sh in shards):
        raise LoadError(f"{path}: not a valid trace manifest: \"shards\" must be a list of {{\"file\": name}} "
                        f"objects naming files of the directory, got {shards!r:.200}")
    return manifest


def _embeddings(trace_dir: str | os.PathLike) -> torch.Tensor:
    from sida_moe._native import LoadError

    path = os.path.join(trace_dir, EMBEDDINGS_NAME)
    tensors = _load_trace_file(path)
    if "weight" not in tensors:
        raise LoadError(f"{path}: holds no 'weight' tensor (the traced model's embedding table)")
    return tensors["weight"]


# manifest entries that must agree for traces to be concatenated (the same model and recording)
_SAME_MODEL_KEYS = ("hidden_size", "num_moe_layers", "moe_layer_ids", "num_experts", "top_k", "top_t", "seq_len")


def load_traces(trace_dir: str | os.PathLike, *more_dirs: str | os.PathLike, compact: bool = False) -> Traces:
    """Load every shard of a trace directory (plus its embedding table).

    ``more_dirs``: further trace directories of the same model (e.g. a second corpus), appended in
    order; their model facts, recording settings and embedding tables must match the first's.
    ``compact``: keep the on-disk dtypes (int32 / int16 ids, float16 logits) instead of widening to
    int64 / float32 -- about a third of the memory, for traces of tens of millions of tokens
    (training and evaluation widen each batch as they gather it).
    """
    dirs = [trace_dir, *more_dirs]
    manifests = [read_manifest(d) for d in dirs]
    manifest = dict(manifests[0])
    emb = _embeddings(trace_dir)
    for d, m in zip(dirs[1:], manifests[1:]):
        diff = [key for key in _SAME_MODEL_KEYS if m.get(key) != manifest.get(key)]
        if diff:
            raise ValueError(f"trace {os.fspath(d)!r} does not match {os.fspath(trace_dir)!r} in {diff}: "
                             "only traces of the same model and recording settings can be loaded together")
        if not torch.equal(_embeddings(d), emb):
            raise ValueError(f"trace {os.fspath(d)!r} holds other embeddings than {os.fspath(trace_dir)!r}: not the same model")
    parts = [part for d in dirs for part in iter_shards(d)]
    if not parts:
        raise ValueError(f"trace directory {os.fspath(trace_dir)!r} has no shards")
    gate = all(bool(m.get("next_layer_gate")) for m in manifests) and all("gate_ids" in p for p in parts)
    moe_inputs = moe_input_rows = None
    if any("moe_inputs" in p for p in parts):
        # shard-local rows -> rows of the concatenated trace
        offsets = torch.tensor([0] + [p["input_ids"].shape[0] for p in parts]).cumsum(0)
        moe_input_rows = torch.cat([p.pop("moe_input_rows").long() + int(offsets[i])
                                    for i, p in enumerate(parts) if "moe_inputs" in p])
        moe_inputs = torch.cat([p.pop("moe_inputs") for p in parts if "moe_inputs" in p], dim=1)
    if more_dirs:
        manifest["num_sequences"] = sum(int(m["num_sequences"]) for m in manifests)
        manifest["next_layer_gate"] = gate
        manifest["sources"] = [os.fspath(d) for d in dirs]

    def cat(name: str, dim: int, wide: torch.dtype) -> torch.Tensor:
        out = torch.cat([p.pop(name) for p in parts], dim=dim)  # pop: one copy alive at a time
        return out if compact else out.to(wide)

    return Traces(
        manifest,
        cat("input_ids", 0, torch.int64),
        cat("topk_ids", 1, torch.int64),
        cat("logit_ids", 1, torch.int64),
        cat("logit_vals", 1, torch.float32),
        emb,
        cat("gate_ids", 1, torch.int64) if gate else None,
        cat("gate_vals", 1, torch.float32) if gate else None,
        moe_inputs,  # float16 either way: the heads' training reads them batch by batch
        moe_input_rows,
    )


__all__ = ["Traces", "iter_shards", "load_traces", "read_manifest"]
