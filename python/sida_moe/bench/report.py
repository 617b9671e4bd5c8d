"""Benchmark output: JSON, a markdown table, and PNG plots."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

# Columns of the markdown table, in order: (key in a result row, header, format). Decode figures
# are per step (one token per row of the batch); see runner.decode_cache_metrics and bound.py.
_COLUMNS = [
    ("system", "system", "{}"),
    ("policy", "policy", "{}"),
    ("predictor", "predictor", "{}"),
    ("budget_fraction", "budget", "{:.0%}"),
    ("batch_size", "batch", "{}"),
    ("decode_tokens_per_s", "decode tok/s", "{:.2f}"),  # median over rounds
    ("decode_spread", "spread", "{:.1%}"),  # (slowest - fastest round) / median
    ("decode_ms_per_step", "ms/step", "{:.2f}"),
    ("host_ms_per_step", "host ms/step", "{:.3f}"),  # how: host_ms_method in bench.json
    ("decode_loop", "decode", "{}"),  # graph replay or eager forwards
    ("prefill_tokens_per_s", "prefill tok/s", "{:.1f}"),
    ("ttft_ms", "TTFT ms", "{:.1f}"),
    ("peak_gpu_gib", "peak GPU GiB", "{:.2f}"),
    ("hit_rate", "hit rate", "{:.1%}"),  # the N-token call, prefill included
    # the row's policy alone on the same visits, every copy landed in time (bench.policy_replay)
    ("policy_hit_rate", "policy alone", "{:.1%}"),
    ("decode_hit_rate", "decode hit", "{:.1%}"),
    ("decode_miss_mb_per_step", "miss MB/step", "{:.1f}"),  # misses x expert bytes
    ("decode_copied_mb_per_step", "copied MB/step", "{:.1f}"),
    ("bound_tokens_per_s", "bound tok/s", "{:.2f}"),
    ("fraction_of_bound", "of bound", "{:.1%}"),
    ("prefetch_precision", "prefetch prec.", "{:.1%}"),
    ("pcie_mb_per_token", "PCIe MB/tok", "{:.1f}"),
    ("achieved_gbps", "GB/s", "{:.1f}"),
    ("stall_fraction", "stall", "{:.1%}"),  # GPU wait on copies in flight (CUDA); see metrics.engine_metrics
    ("acquire_stream_fraction", "acquire", "{:.1%}"),  # stream time across acquire, host bookkeeping included
    ("same_tokens_as_resident", "same tokens", "{}"),
    # teacher-forced on the resident's tokens; see runner.logit_agreement
    ("logits_max_abs_diff", "max abs dlogit", "{:.3f}"),
    ("resident_margin_at_first_difference", "resident top-2 margin there", "{:.3f}"),
]


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per result row; columns absent from every row are left out."""
    cols = [c for c in _COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), f) for k, _, f in cols) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2, default=str) + "\n")


def _budget_series(rows: list[dict[str, Any]], metric: str) -> tuple[dict[str, list[tuple[float, float]]], dict[str, float]]:
    """``metric`` per label: (budget, value) points of the offloaded systems, one value of each
    reference system without a budget (all resident, CPU offload)."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    flat: dict[str, float] = {}
    for r in rows:
        y = r.get(metric)
        if y is None or (isinstance(y, float) and math.isnan(y)):
            continue
        label = r["system"] if r.get("policy") in (None, "-") else f"{r['system']} {r['policy']}/{r.get('predictor', '-')}"
        if r.get("budget_fraction") is None:
            flat[label] = y
        else:
            series[label].append((r["budget_fraction"], y))
    return series, flat


def budget_figure(rows: list[dict[str, Any]], metric: str, ylabel: str):
    """The matplotlib figure of ``metric`` against the expert budget (None if nothing to plot): a
    line per (system, policy, predictor) and the reference systems as horizontal lines; with a
    single budget, where lines would be one column of points, a bar per system instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series, flat = _budget_series(rows, metric)
    if not series and not flat:
        return None
    budgets = sorted({x for pts in series.values() for x, _ in pts})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(budgets) <= 1:
        labels = sorted(series) + sorted(flat)
        values = [series[k][0][1] for k in sorted(series)] + [flat[k] for k in sorted(flat)]
        ax.bar(range(len(labels)), values, color=[f"C{i % 10}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        if budgets:
            ax.set_title(f"expert budget {100 * budgets[0]:g}% of all experts on the GPU", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    else:
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        for i, (label, y) in enumerate(sorted(flat.items())):
            ax.axhline(y, linestyle="--", color=f"C{(len(series) + i) % 10}", label=label)
        ax.set_xlabel("expert budget (% of all experts on the GPU)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def plot_vs_budget(rows: list[dict[str, Any]], metric: str, ylabel: str, path: Path) -> bool:
    """Save :func:`budget_figure` as a PNG at ``path``; False if there is nothing to plot."""
    fig = budget_figure(rows, metric, ylabel)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_timeline(events: list[dict[str, Any]], path: Path) -> bool:
    """Copies against compute for a few decode steps: ``events`` holds dicts with ``lane`` ("copy" or
    "compute"), ``start_ms`` and ``dur_ms`` (from a profiler trace). False if there is nothing to plot."""
    if not events:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lanes = sorted({e["lane"] for e in events})
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.6 * len(lanes)))
    for i, lane in enumerate(lanes):
        spans = [(e["start_ms"], e["dur_ms"]) for e in events if e["lane"] == lane]
        ax.broken_barh(spans, (i - 0.4, 0.8), color=f"C{i}")
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_xlabel("time (ms)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
