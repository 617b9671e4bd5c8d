"""The figures of a benchmark row: token and logit agreement with the reference, the engine's
cache and copy metrics of a call, decode-only cache metrics, and host time per step."""

from __future__ import annotations

import hashlib
import statistics
from typing import Any

import torch
from torch import nn

from sida_moe.bench.timing import DecodeTiming, Round

def token_agreement(tokens: torch.Tensor, reference: torch.Tensor | None) -> dict[str, Any]:
    """``tokens_digest`` (which systems generated the same tokens as each other) and, against the
    resident model's ``reference`` tokens, ``same_tokens_as_resident`` and where they first differ
    (a bf16 near-tie can flip under another GEMM's summation order)."""
    out: dict[str, Any] = {"tokens_digest": hashlib.sha1(tokens.to(torch.int64).numpy().tobytes()).hexdigest()[:12]}
    if reference is not None:
        out["same_tokens_as_resident"] = bool(torch.equal(tokens, reference))
        if not out["same_tokens_as_resident"]:
            differs = (tokens != reference).any(dim=0).nonzero() if tokens.shape == reference.shape else None
            out["first_token_differing_from_resident"] = int(differs[0]) if differs is not None and differs.numel() else 0
    return out


def teacher_forced_logits(model: nn.Module, prompts: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """``[B, n, V]`` float32 logits (host) the model gives each of the ``n`` generated positions when
    fed the prompt and ``tokens [B, n]`` in one forward: every system is scored on the same input."""
    ids = prompts["input_ids"]
    tokens = tokens.to(ids.device)
    full = torch.cat([ids, tokens], dim=1)
    mask = torch.cat([prompts["attention_mask"], torch.ones_like(tokens)], dim=1)
    with torch.inference_mode():
        logits = model(input_ids=full, attention_mask=mask).logits
    p = ids.shape[1]
    return logits[:, p - 1 : p - 1 + tokens.shape[1]].float().cpu()


def logit_agreement(logits: torch.Tensor, reference_logits: torch.Tensor, first_difference: int | None) -> dict[str, Any]:
    """How far a system's teacher-forced logits are from the resident model's (the same input), and,
    where its greedy tokens first differed, the resident's own top-1 / top-2 logit margin there: a
    margin below the logit difference is a near-tie that rounding (another kernel's summation order)
    may flip, not a wrong expert."""
    out: dict[str, Any] = {"logits_max_abs_diff": float((logits - reference_logits).abs().max())}
    if first_difference is not None and first_difference < reference_logits.shape[1]:
        top2 = reference_logits[:, first_difference].topk(2, dim=-1).values
        out["resident_margin_at_first_difference"] = float((top2[:, 0] - top2[:, 1]).min())
    return out


# the bench's sampling: the model's distribution itself, no filter
def engine_metrics(s: dict[str, Any], tokens: int, seconds: float, expert_nbytes: int) -> dict[str, Any]:
    """Cache and copy metrics of one call (``s``: the engine's stats after it, reset before it;
    ``tokens`` prompt and generated of the whole batch; ``seconds`` its wall time). The stall is,
    on CUDA (``StallTimer``), the GPU time the compute stream waited on slot-ready
    events of copies still in flight (``stream_wait_seconds``); on the host backend, where copies
    are synchronous memcpy, the host time of the acquire calls that had to load or wait
    (``host_stall_seconds``). The acquire fraction (CUDA only) is the older, wider measurement:
    compute-stream time between CUDA events recorded just before and after each acquire call,
    which in a host-bound decode also counts the host's bookkeeping inside acquire. Both
    fractions are over the call's time (prefill + decode). PCIe bytes are the copies into slots
    plus the experts that table-path misses read in place from the pinned pool."""
    issued = s.get("prefetch_issued", 0.0)
    stall = s.get("stream_wait_seconds", s.get("host_stall_seconds", 0.0))
    acquire = s.get("acquire_stream_seconds")
    return {
        "hit_rate": s.get("hit_rate"),
        "hits": s.get("hits"),
        "misses": s.get("misses"),
        "prefetch_issued": issued,
        "prefetch_used": s.get("prefetch_used"),
        "prefetch_precision": s.get("prefetch_used", 0.0) / issued if issued else None,
        "pcie_mb_per_token": (s.get("bytes_copied", 0.0) + s.get("routed_misses", 0.0) * expert_nbytes) / 1e6 / max(tokens, 1),
        "achieved_gbps": s.get("achieved_gbps"),
        "stall_seconds": stall,
        "stall_fraction": stall / seconds if seconds > 0 else None,
        "stream_waits": s.get("stream_waits"),
        "acquire_stream_seconds": acquire,
        "acquire_stream_fraction": acquire / seconds if acquire is not None and seconds > 0 else None,
        "num_slots": s.get("num_slots"),
        "slot_gib": s.get("slot_bytes", 0.0) / 2**30,
        # the prefetcher's own scores of its predictions, those it reports (absent for others)
        **{name: s[f"prefetch_{key}"] for key, name in (
            ("hit_rate", "predictor_recall"), ("precision", "predictor_precision"),
            ("scored_experts", "predictor_scored_experts"))
            if f"prefetch_{key}" in s},
    }


def decode_cache_metrics(first: dict[str, Any], full: dict[str, Any], steps: int, expert_nbytes: int) -> dict[str, Any]:
    """Decode-only cache figures of one round: the engine's counters after the N-token call less
    those after the 1-token call (each reset before its call: prefill and the first token cancel),
    per decode step (``steps`` = N - 1; a step makes one token per row). Each miss reads its
    expert's bytes once over the host link: in place (zero-copy) on the expert-table path, as a
    copy into a slot on the acquire path; ``copied`` is what the copy engines moved (demand loads
    of misses, prefetches). ``decode_eager_steps``: steps run as model forwards, not graph replays."""
    # the two prefills meet different cache contents, so a difference can dip below zero when the
    # decode part is small: counted as zero
    d = {k: max(float(full.get(k, 0.0)) - float(first.get(k, 0.0)), 0.0)
         for k in ("hits", "misses", "bytes_copied", "forwards")}
    lookups = d["hits"] + d["misses"]
    return {
        "decode_hit_rate": d["hits"] / lookups if lookups > 0 else None,
        "decode_misses_per_step": d["misses"] / steps,
        "decode_miss_mb_per_step": d["misses"] * expert_nbytes / steps / 1e6,
        "decode_copied_mb_per_step": d["bytes_copied"] / steps / 1e6,
        "decode_eager_steps": d["forwards"],
    }


def median_of(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """Key by key, the median over rounds of the numbers (None where a round has none)."""
    out: dict[str, Any] = {}
    for k in dicts[0]:
        vals = [d[k] for d in dicts if isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool)]
        out[k] = statistics.median(vals) if len(vals) == len(dicts) else None
    return out


def host_ms(rounds: list[Round], timing: DecodeTiming, device: torch.device) -> dict[str, Any]:
    """Host CPU per decode step. A replayed decode step is one launch: on CUDA the inference thread
    busy-waits on the full launch queue meanwhile, so its CPU time is the decode time, not the
    host's cost; that is the host time of one replay with the device idle (``enqueue_ms``).
    Otherwise the process CPU time per step (every thread); on CUDA it includes the spin-waits
    on the device's work (an upper bound)."""
    probes = [r.extra.get("enqueue_ms") for r in rounds]
    if probes and all(p is not None for p in probes):
        return {"host_ms_per_step": statistics.median(probes), "host_ms_method": "enqueue of one graph replay, device idle"}
    return {"host_ms_per_step": statistics.median(timing.cpu_seconds_per_step()) * 1e3,
            "host_ms_method": "process CPU time" + (" (includes spin-waits on the device)" if device.type == "cuda" else "")}
