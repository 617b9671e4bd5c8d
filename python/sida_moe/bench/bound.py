"""The decode bound an offloaded row is held to: with every expert resident a decode step takes
``t_step at 100%``; each decode miss adds its expert's bytes read over the host link (in place,
zero-copy, on the expert-table path), so at best

    tokens/s = batch / (t_step at 100% + miss bytes per step / zero-copy GB/s)

The zero-copy bandwidth is measured in this process, at the decode shape, by the kernels the
decode step runs.
"""

from __future__ import annotations

import math

import torch


def zero_copy_gbps(engine, batch_size: int, calls: int = 24, seed: int = 0) -> float | None:
    """GB/s that ``fused_experts_table`` reads experts at straight from the pool: ``calls`` calls
    of ``batch_size`` tokens, each token routed to ``top_k`` experts of one MoE layer (distinct
    where the layer has enough), through a table whose entries all point at the pool records (what
    the engine's table holds for experts not in a slot). Calls walk the layers so no call reads
    bytes a previous one left in L2. On CUDA that is the pinned pool read over the link; on the
    host backend it is only host memory bandwidth (the bench leaves the bound empty there). None
    where decode does not run the table kernels."""
    from sida_moe.bench.timing import timed
    from sida_moe.format import ExpertAddresses
    from sida_moe.kernels import fused_experts_table, table_kernels_usable

    device, pool, fmt = engine.device, engine.pool, engine.fmt
    if not table_kernels_usable(device, fmt):
        return None
    engine.quiesce()  # no copy shares the link with the probe
    g = torch.Generator().manual_seed(seed)
    work = []
    for i in range(calls + 2):  # two warm-up calls (kernel load) first
        layer = engine.layers[i % len(engine.layers)]
        addrs = torch.tensor([pool.host_ptr(layer.ordinal, e) for e in range(layer.num_experts)], dtype=torch.int64)
        pairs = batch_size * layer.top_k
        order = torch.cat([torch.randperm(layer.num_experts, generator=g) for _ in range(-(-pairs // layer.num_experts))])
        ids = order[:pairs].view(batch_size, layer.top_k)
        table = ExpertAddresses(addrs.to(device), pool.tensor_offsets, pool.expert_nbytes)
        weights = torch.full((batch_size, layer.top_k), 1.0 / layer.top_k, device=device)
        work.append((table, ids.to(device), weights, ids.unique().numel() * pool.expert_nbytes))
    x = torch.randn(batch_size, fmt.hidden, generator=g).to(device=device, dtype=fmt.dtype)

    def run(items) -> None:
        for table, ids, weights, _ in items:
            fused_experts_table(x, ids, weights, table, fmt)

    run(work[:2])
    seconds = timed(lambda: run(work[2:]), device).wall_s
    return sum(n for *_, n in work[2:]) / seconds / 1e9 if seconds > 0 else None


def decode_bound(batch_size: int, step_ms_at_full: float | None, miss_bytes_per_step: float | None,
                 gbps: float | None) -> float | None:
    """Tokens/s of the bound (module docstring); None when a term is unknown."""
    terms = (step_ms_at_full, miss_bytes_per_step, gbps)
    if any(t is None or not math.isfinite(t) for t in terms) or step_ms_at_full <= 0 or gbps <= 0 or miss_bytes_per_step < 0:
        return None
    return batch_size / (step_ms_at_full / 1e3 + miss_bytes_per_step / (gbps * 1e9))


#: the rows held to the bound: those the offload engine served
OFFLOADED = ("sida", "ondemand_lru", "sida_sync")


def attach_bounds(rows: list[dict], gbps: dict[int, float | None]) -> None:
    """Add the bound to every offloaded row, per batch size: ``bound_step_ms_at_full`` is the
    fastest decode step of an offloaded row at a 100% budget (every expert resident), ``gbps`` the
    measured zero-copy GB/s; ``bound_tokens_per_s`` and the row's ``fraction_of_bound``. Empty
    (None) without a 100% row or a bandwidth (the CPU)."""
    for b in {r["batch_size"] for r in rows}:
        mine = [r for r in rows if r["batch_size"] == b and r["system"] in OFFLOADED]
        full = [r["decode_ms_per_step"] for r in mine if r.get("budget_fraction") == 1.0
                and math.isfinite(r.get("decode_ms_per_step", math.nan))]
        step = min(full) if full else None
        for r in mine:
            miss = r.get("decode_miss_mb_per_step")
            bound = decode_bound(b, step, miss * 1e6 if miss is not None else None, gbps.get(b))
            r["bound_step_ms_at_full"] = step
            r["zero_copy_gbps"] = gbps.get(b)
            r["bound_tokens_per_s"] = bound
            r["fraction_of_bound"] = r["decode_tokens_per_s"] / bound if bound else None
