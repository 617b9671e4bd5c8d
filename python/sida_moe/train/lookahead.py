"""Training and evaluating the lookahead heads (``HashPredictor.look_ahead``, see ``model.py``).

The run-ahead network sees only token embeddings. Once MoE layer l-1 has run, its router input --
the token's real hidden state -- is known on the inference thread, and layer l's experts can still
be prefetched behind layer l-1's experts and layer l's attention. The heads learn, per layer, a
correction of the frozen network's logits from that state, with the network's own loss (top-k
target plus truncated distillation). They need a trace recorded with ``moe_inputs_every > 0``;
the network itself is not retrained. The heads also read the previous token's router input of
layer L-2, and layer 0's head reads the token's embedding (see ``model.py``); evaluation reports
decode recall (that state known: every token after a sequence's first) and prompt recall
(unknown) separately.

    traces = load_traces("trace-train")              # recorded with moe_inputs_every=8
    report = train_lookahead(predictor, traces, LookaheadConfig(device="cuda"), held_out=held)
    predictor.save("predictor/")                     # the heads are saved with the network
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Sequence

import torch
from torch import nn

from sida_moe.predictor.model import HashPredictor
from sida_moe.train.configs import LookaheadConfig
from sida_moe.train.trace_loading import Traces
from sida_moe.train.predictor_training import _tf32_matmuls, distillation_loss, warmup_cosine
from sida_moe.train.step_loop import StepBudget, StepRun, run_steps


class _TokenTable:
    """The sequences with router inputs, flattened to tokens, on the training device: every layer's
    run-ahead logits (computed once by each part's frozen network), targets, layers 0..L-2's router
    inputs, each token's id (its embedding is the state before layer 0) and whether it has a
    previous token in its sequence. ``parts``: (traces, the network whose logits the heads see on
    them)."""

    def __init__(self, parts: list[tuple[Traces, HashPredictor]], device: torch.device, top_t: int,
                 batch_size: int = 64) -> None:
        names = ("logits", "inputs", "topk", "ids", "vals", "tokens", "has_prev")
        cols: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self.num_sequences = 0
        self.embeddings = parts[0][0].embeddings.to(device, torch.float16)
        for traces, base in parts:
            data = traces.with_moe_inputs()
            self.num_sequences += data.num_sequences
            t = min(top_t, data.logit_ids.shape[-1])
            base.to(device).eval()
            with torch.no_grad():
                for start in range(0, data.num_sequences, batch_size):
                    ids = data.input_ids[start : start + batch_size].long()
                    embeds = data.embeddings[ids].to(device=device, dtype=torch.float32)
                    out, _ = base(embeds)  # [L, B, S, E]
                    cols["logits"].append(out.float().flatten(1, 2))
            cols["inputs"].append(data.moe_inputs.flatten(1, 2).to(device, torch.float16))
            cols["topk"].append(data.topk_ids.flatten(1, 2).to(device, torch.int64))
            cols["ids"].append(data.logit_ids[..., :t].flatten(1, 2).to(device, torch.int64))
            cols["vals"].append(data.logit_vals[..., :t].flatten(1, 2).to(device, torch.float32))
            cols["tokens"].append(data.input_ids.flatten().to(device, torch.int64))
            positions = torch.arange(data.input_ids.shape[1]).expand_as(data.input_ids)
            cols["has_prev"].append((positions > 0).flatten().to(device))
        cat = {name: col[0] if len(col) == 1 else torch.cat(col, dim=-1 if name in ("tokens", "has_prev") else 1)
               for name, col in cols.items()}
        del cols
        self.logits, self.inputs = cat["logits"], cat["inputs"]  # [L, N, E], [L-1, N, d]
        self.topk_ids, self.logit_ids, self.logit_vals = cat["topk"], cat["ids"], cat["vals"]
        self.token_ids, self.has_prev = cat["tokens"], cat["has_prev"]  # [N], [N]
        self.num_tokens = self.logits.shape[1]

    def batch(self, idx: torch.Tensor, dropout: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The heads' inputs for tokens ``idx``: the states before every layer ``[L, B, d]`` and the
        previous token's layer L-2 router input ``[B, d]`` (zeros at a sequence's first token and,
        with probability ``dropout``, elsewhere too)."""
        states = torch.cat([self.embeddings[self.token_ids[idx]][None], self.inputs[:, idx]])
        keep = self.has_prev[idx] & (torch.rand(idx.shape[0], generator=gen) >= dropout).to(idx.device)
        previous = self.inputs[-1, (idx - 1).clamp(min=0)] * keep[:, None].to(self.inputs.dtype)
        return states, previous


def train_lookahead(
    predictor: HashPredictor,
    traces: Traces | Sequence[Traces],
    config: LookaheadConfig | None = None,
    held_out: Traces | None = None,
    progress: bool = True,
    base: HashPredictor | Sequence[HashPredictor] | None = None,
) -> dict:
    """Add lookahead heads to ``predictor`` (replacing any it has) and train them on the sequences of
    ``traces`` that hold router inputs; the network's own weights stay as they are. Returns a report
    (steps, loss, timing and, with ``held_out``, ``evaluate_lookahead`` on it).

    ``base``: the network whose run-ahead logits the heads learn to correct during training (default:
    ``predictor``). When ``predictor`` was trained on these same sequences its logits there are better
    than on unseen text, and the heads learn to trust them too much. Cross-fitting avoids that: pass
    ``traces`` as a list of parts and ``base`` as a list of networks of the same variant, each trained
    without its part, so the heads see logits as good as they will be at decode on every sequence."""
    config = config or LookaheadConfig()
    parts = list(traces) if isinstance(traces, (list, tuple)) else [traces]
    bases = list(base) if isinstance(base, (list, tuple)) else [base or predictor] * len(parts)
    if not parts or len(bases) != len(parts):
        raise ValueError(f"give one base network per trace part: got {len(parts)} parts and {len(bases)} networks")
    for net in [predictor, *bases]:
        net.config.require_own_routing("the lookahead heads")
    manifest = parts[0].manifest
    num_layers = manifest["num_moe_layers"]
    if num_layers < 2:
        raise ValueError("lookahead heads need at least 2 MoE layers (layer 0 has no layer before it)")
    sizes = (num_layers, manifest["num_experts"], manifest["hidden_size"])
    for part in parts[1:]:
        if (part.manifest["num_moe_layers"], part.manifest["num_experts"], part.manifest["hidden_size"]) != sizes:
            raise ValueError("the trace parts come from models of different sizes")
    for name, net in [("predictor", predictor)] + [(f"base[{i}]", net) for i, net in enumerate(bases)]:
        if (net.config.num_moe_layers, net.config.num_experts, net.config.input_dim) != sizes:
            raise ValueError(f"{name} sizes do not match the trace's model (MoE layers / experts / hidden size)")
    device = torch.device(config.device)
    with _tf32_matmuls(device):
        return _train(predictor, list(zip(parts, bases)), config, held_out, progress, device)


def _train(predictor: HashPredictor, parts: list[tuple[Traces, HashPredictor]], config: LookaheadConfig,
           held_out: Traces | None, progress: bool, device: torch.device) -> dict:
    torch.manual_seed(config.seed)
    t_start = time.perf_counter()
    predictor.to(device)
    table = _TokenTable(parts, device, config.top_t)
    heads = predictor.add_lookahead(config.hidden)
    run = _fit_heads(heads, table, config, device, progress)
    losses = run.losses
    report = {
        "config": asdict(config),
        "parameters": sum(p.numel() for p in heads.parameters()),
        "logits_from": "predictor" if all(net is predictor for _, net in parts) else f"{len(parts)} base networks",
        "train_sequences": table.num_sequences,
        "train_tokens": table.num_tokens,
        "steps_run": run.steps,
        "train_seconds": run.seconds,
        "total_seconds": time.perf_counter() - t_start,
        "loss_first": losses[0],
        "loss_last_50": sum(losses[-50:]) / len(losses[-50:]),
    }
    del table  # the training tokens, before the held-out ones are evaluated
    if held_out is not None:
        report["held_out"] = evaluate_lookahead(predictor, held_out, device=config.device)
    return report


def _fit_heads(heads: nn.Module, table: _TokenTable, config: LookaheadConfig, device: torch.device,
               progress: bool) -> StepRun:
    """Distil the heads on batches of ``table``'s tokens; they are left in eval mode."""
    heads.train()
    opt = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    budget = StepBudget(config.steps, config.max_seconds)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, config.warmup_steps, budget.total))
    gen = torch.Generator().manual_seed(config.seed)
    batch = min(config.batch_tokens, table.num_tokens)

    def step_loss() -> torch.Tensor:
        idx = torch.randint(0, table.num_tokens, (batch,), generator=gen).to(device)
        states, previous = table.batch(idx, config.previous_dropout, gen)
        logits = heads(states, table.logits[:, idx], previous)
        return distillation_loss(logits, table.topk_ids[:, idx], table.logit_ids[:, idx], table.logit_vals[:, idx],
                                 config.kd_weight, config.top_t, config.target)

    run = run_steps(budget, step_loss, opt, sched, heads.parameters(), 1.0, "train-lookahead", progress, postfix_every=100)
    heads.eval()
    return run


def evaluate_lookahead(predictor: HashPredictor, traces: Traces, k: int | None = None, device: str = "cpu",
                       batch_size: int = 64) -> dict:
    """Top-k recall per MoE layer on the sequences of ``traces`` that hold router inputs: the run-ahead
    prediction (``recall@k``), the prediction once the state before the layer is known at decode
    (``lookahead_recall@k``: the previous token's state known from a sequence's second token on)
    and for a prompt's tokens (``prompt_lookahead_recall@k``: that state unknown)."""
    if predictor.lookahead is None:
        raise ValueError("this predictor has no lookahead heads (train them with train_lookahead)")
    data = traces.with_moe_inputs()
    top_k, num_experts = data.manifest["top_k"], data.manifest["num_experts"]
    k = top_k if k is None else k
    if not 0 < k <= num_experts:
        raise ValueError(f"k must be in [1, {num_experts}], got {k}")
    dev = torch.device(device)
    predictor.to(dev).eval()
    heads = predictor.lookahead
    num_layers = data.manifest["num_moe_layers"]
    kinds = ("base", "look", "prompt")
    hits = {kind: torch.zeros(num_layers, dtype=torch.float64) for kind in kinds}
    tokens = 0
    with torch.no_grad():
        for start in range(0, data.num_sequences, batch_size):
            ids = data.input_ids[start : start + batch_size].long()
            embeds = data.embeddings[ids].to(device=dev, dtype=torch.float32)
            logits, _ = predictor(embeds)  # [L, B, S, E]
            true = data.topk_ids[:, start : start + batch_size].to(dev).long()
            mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, true, True)
            inputs = data.moe_inputs[:, start : start + batch_size].to(dev)  # [L-1, B, S, d]
            states = torch.cat([embeds[None].to(inputs.dtype), inputs]).flatten(1, 2)
            flat = logits.flatten(1, 2)
            last = inputs[-1]  # the previous token's layer L-2 router input; zeros at position 0
            previous = torch.cat([torch.zeros_like(last[:, :1]), last[:, :-1]], dim=1).flatten(0, 1)
            looked = {"base": logits, "look": heads(states, flat, previous).view_as(logits),
                      "prompt": heads(states, flat, None).view_as(logits)}
            for kind, lg in looked.items():
                hits[kind] += mask.gather(-1, lg.topk(k, dim=-1).indices).sum(dim=(1, 2, 3)).double().cpu()
            tokens += ids.numel()
    names = {"base": f"recall@{k}", "look": f"lookahead_recall@{k}", "prompt": f"prompt_lookahead_recall@{k}"}
    per_layer = [{"layer": l, **{names[kind]: float(hits[kind][l] / (tokens * top_k)) for kind in kinds}}
                 for l in range(num_layers)]
    return {
        "tokens": tokens,
        "k": k,
        **{f"mean_{names[kind]}": sum(r[names[kind]] for r in per_layer) / num_layers for kind in kinds},
        "per_layer": per_layer,
    }


__all__ = ["evaluate_lookahead", "train_lookahead"]
