"""A trained predictor's evaluation on held-out traces (recall, precision, hash-routing figures,
``format_report``) and the fits run after training: the temperature of the predicted routing
weights and the gate weights of hash routing."""

from __future__ import annotations

import torch

from sida_moe.predictor.model import HashPredictor
from sida_moe.train.batches import TraceBatches, shifted_targets, dense_logits
from sida_moe.train.trace_loading import Traces


TEMPERATURE_GRID = (0.125, 0.18, 0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6, 8.0)


def weight_errors(predicted: torch.Tensor, router: torch.Tensor, k: int, grid: tuple[float, ...],
                  normalize: bool = True) -> torch.Tensor:
    """Summed squared error ``[len(grid), L]`` between hash routing's predicted weights (softmax of
    ``predicted / t`` at its top-k, for each temperature t of ``grid``) and the router's weights at
    the same experts (softmax of ``router``), over the tokens of ``predicted`` / ``router``
    ``[L, ..., E]``; both renormalised over the k experts when ``normalize``."""
    ids = predicted.topk(k, dim=-1).indices
    want = torch.softmax(router.float(), dim=-1).gather(-1, ids)
    if normalize:
        want = want / want.sum(-1, keepdim=True)
    errors = []
    for t in grid:
        got = torch.softmax(predicted.float() / t, dim=-1).gather(-1, ids)
        if normalize:
            got = got / got.sum(-1, keepdim=True)
        errors.append((got - want).pow(2).flatten(1).sum(-1))
    return torch.stack(errors)


def fit_weight_temperature(
    predictor: HashPredictor,
    traces: Traces,
    device: str = "cpu",
    grid: tuple[float, ...] = TEMPERATURE_GRID,
    normalize: bool = True,
    batch_size: int = 64,
) -> dict:
    """Choose, per MoE layer, the temperature of hash routing's predicted weights that brings them
    closest to the router's weights at the same experts on ``traces`` (training text), store them
    in ``predictor.config.weight_temperature`` and return ``{"weight_temperature",
    "error_by_temperature"}``. The predictor is trained to rank experts (top-k target plus a
    distillation term), not to match the router's weight spread; with router weights at the
    predicted experts hash routing is near-exact (NOTES.md), so the weights are what the fit fixes.
    The router's logits come from the trace's top T (the others count as ranked last)."""
    if not grid or any(not t > 0 for t in grid):
        raise ValueError(f"grid must be non-empty positive temperatures, got {grid}")
    dev = torch.device(device)
    predictor = predictor.to(dev).eval()
    batches = TraceBatches(traces, dev, top_t=traces.logit_ids.shape[-1])
    k, num_experts = traces.manifest["top_k"], traces.manifest["num_experts"]
    errors = torch.zeros(len(grid), traces.manifest["num_moe_layers"], dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, traces.num_sequences, batch_size):
            rows = torch.arange(start, min(start + batch_size, traces.num_sequences))
            embeds, _, logit_ids, logit_vals = batches(rows)
            logits, _ = predictor(embeds)
            router = dense_logits(logit_ids, logit_vals, num_experts)
            errors += weight_errors(logits, router, k, grid, normalize).double().cpu()
    best = errors.argmin(dim=0)
    temps = [float(grid[int(i)]) for i in best]
    predictor.config.weight_temperature = temps
    return {"weight_temperature": temps,
            "error_by_temperature": {str(t): [float(e) for e in errors[i]] for i, t in enumerate(grid)}}


GATE_WEIGHT_GRID = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)


def fit_gate_weights(
    predictor: HashPredictor,
    traces: Traces,
    device: str = "cpu",
    grid: tuple[float, ...] = GATE_WEIGHT_GRID,
    batch_size: int = 64,
) -> dict:
    """Choose, per MoE layer l >= 1, the weight of the next-layer gate in the fused correction
    (``HashPredictor.fuse``) that maximises top-k recall on ``traces`` (training text), store them in
    ``predictor.config.gate_weights`` and return ``{"gate_weights", "recall_by_weight"}``."""
    if traces.gate_ids is None:
        raise ValueError("the trace has no next-layer gate (record it with next_layer_gate=True)")
    if not grid or any(not w >= 0 for w in grid):
        raise ValueError(f"grid must be non-empty non-negative weights, got {grid}")
    dev = torch.device(device)
    predictor = predictor.to(dev).eval()
    batches = TraceBatches(traces, dev, top_t=1)
    L, k = traces.manifest["num_moe_layers"], traces.manifest["top_k"]
    hits = torch.zeros(len(grid), L, dtype=torch.float64)
    tokens = 0
    with torch.no_grad():
        for start in range(0, traces.num_sequences, batch_size):
            rows = torch.arange(start, min(start + batch_size, traces.num_sequences))
            embeds, topk_ids, _, _ = batches(rows)
            logits, _ = predictor(embeds)
            gate = batches.gate(rows)
            true_mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, topk_ids, True)
            for i, w in enumerate(grid):
                fused = torch.cat([logits[:1].float(), logits[1:].float() + w * gate])
                pred = fused.topk(k, dim=-1).indices
                hits[i] += true_mask.gather(-1, pred).sum(dim=(1, 2, 3)).double().cpu()
            tokens += embeds.shape[0] * embeds.shape[1]
    recall = hits / (tokens * k)  # [grid, L]
    best = recall.argmax(dim=0)
    weights = [0.0] + [float(grid[int(best[l])]) for l in range(1, L)]
    predictor.config.gate_weights = weights
    return {"gate_weights": weights,
            "recall_by_weight": {str(w): [float(r) for r in recall[i]] for i, w in enumerate(grid)}}


def evaluate(
    predictor: HashPredictor,
    traces: Traces,
    k: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict:
    """Per-layer top-k recall and precision of the predictor on a trace (held-out text).

    With ``k`` predicted experts per token and the router's ``top_k`` true ones, recall is
    |pred ∩ true| / top_k and precision |pred ∩ true| / k. Also reported: recall and precision with
    2k predictions and the paper's hit rate (router top-1 among the predicted top-3). On a trace
    with the next-layer gate: ``gate_recall@k`` (that gate alone) and, when the predictor has fitted
    ``gate_weights``, ``fused_recall@k`` (the prediction each layer has once the layer before it
    ran; layer 0 keeps the run-ahead one). A predictor of the next token's routing (``target_shift=1``) is scored against it (every
    token but the last), without the gate metrics.
    """
    top_k = traces.manifest["top_k"]
    k = top_k if k is None else k
    num_experts = traces.manifest["num_experts"]
    if not 0 < k <= num_experts:
        raise ValueError(f"k must be in [1, {num_experts}], got {k}")
    k2 = min(2 * k, num_experts)
    dev = torch.device(device)
    predictor = predictor.to(dev).eval()
    batches = TraceBatches(traces, dev, top_t=1)  # the report reads the router's top-1 logit id only
    L = traces.manifest["num_moe_layers"]
    sums = {name: torch.zeros(L, dtype=torch.float64)
            for name in ("hit_k", "hit_2k", "top1_in_top3", "hit_gate", "hit_fused")}
    shift = predictor.config.target_shift  # scored against the routing of the token it predicts
    tokens = 0
    has_gate = traces.gate_ids is not None and L > 1 and not shift
    fused = has_gate and bool(predictor.config.gate_weights)
    with torch.no_grad():
        for start in range(0, traces.num_sequences, batch_size):
            rows = torch.arange(start, min(start + batch_size, traces.num_sequences))
            embeds, topk_ids, logit_ids, _ = shifted_targets(batches(rows), shift)
            logits, _ = predictor(embeds)
            true_mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, topk_ids, True)
            for name, kk, lg in (("hit_k", k, logits), ("hit_2k", k2, logits)):
                pred = lg.topk(kk, dim=-1).indices
                sums[name] += true_mask.gather(-1, pred).sum(dim=(1, 2, 3)).double().cpu()
            top3 = logits.topk(min(3, num_experts), dim=-1).indices
            sums["top1_in_top3"] += (top3 == logit_ids[..., :1]).any(-1).sum(dim=(1, 2)).double().cpu()
            if has_gate:
                gate = batches.gate(rows)
                pred = torch.cat([logits[:1].topk(k, dim=-1).indices, gate.topk(k, dim=-1).indices])
                sums["hit_gate"] += true_mask.gather(-1, pred).sum(dim=(1, 2, 3)).double().cpu()
            if fused:
                lg = torch.cat([logits[:1].float()] + [predictor.fuse(logits[l], l, gate[l - 1])[None] for l in range(1, L)])
                pred = lg.topk(k, dim=-1).indices
                sums["hit_fused"] += true_mask.gather(-1, pred).sum(dim=(1, 2, 3)).double().cpu()
            tokens += rows.numel() * (traces.input_ids.shape[1] - shift)
    per_layer = []
    for l in range(L):
        row = {
            "layer": l,
            "decoder_layer": traces.manifest["moe_layer_ids"][l],
            f"recall@{k}": float(sums["hit_k"][l] / (tokens * top_k)),
            f"precision@{k}": float(sums["hit_k"][l] / (tokens * k)),
            f"recall@{k2}": float(sums["hit_2k"][l] / (tokens * top_k)),
            f"precision@{k2}": float(sums["hit_2k"][l] / (tokens * k2)),
            "top1_in_top3": float(sums["top1_in_top3"][l] / tokens),
        }
        if has_gate:  # layer 0 has no gate before it: its entry is the run-ahead prediction's
            row[f"gate_recall@{k}"] = float(sums["hit_gate"][l] / (tokens * top_k))
        if fused:
            row[f"fused_recall@{k}"] = float(sums["hit_fused"][l] / (tokens * top_k))
        per_layer.append(row)

    def mean(key: str) -> float:
        return sum(r[key] for r in per_layer) / L

    report = {
        "tokens": tokens,
        "k": k,
        "top_k": top_k,
        "num_experts": num_experts,
        f"mean_recall@{k}": mean(f"recall@{k}"),
        f"mean_precision@{k}": mean(f"precision@{k}"),
        f"mean_recall@{k2}": mean(f"recall@{k2}"),
        "mean_top1_in_top3": mean("top1_in_top3"),
        "per_layer": per_layer,
    }
    if has_gate:
        report[f"mean_gate_recall@{k}"] = mean(f"gate_recall@{k}")
    if fused:
        report[f"mean_fused_recall@{k}"] = mean(f"fused_recall@{k}")
    return report


def format_report(report: dict) -> str:
    """A human-readable table of ``evaluate``'s output."""
    k = report["k"]
    keys = [key for key in report["per_layer"][0] if key not in ("layer", "decoder_layer")]
    lines = ["layer " + " ".join(f"{key:>18}" for key in keys)]
    for row in report["per_layer"]:
        lines.append(f"{row['layer']:>5} " + " ".join(f"{row[key]:>18.4f}" for key in keys))
    lines.append(f"mean recall@{k} = {report[f'mean_recall@{k}']:.4f} over {report['tokens']} tokens")
    for key, what in ((f"mean_gate_recall@{k}", "next-layer gate alone"),
                      (f"mean_fused_recall@{k}", "fused: once the layer before has run")):
        if key in report:
            lines.append(f"{key} = {report[key]:.4f} ({what})")
    return "\n".join(lines)


__all__ = ["GATE_WEIGHT_GRID", "TEMPERATURE_GRID", "evaluate", "fit_gate_weights", "fit_weight_temperature", "format_report", "weight_errors"]
