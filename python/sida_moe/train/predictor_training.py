"""Training the hash function by truncated knowledge distillation (``TrainConfig``,
``train_predictor``), and what hash routing costs in held-out loss (``hash_routing_loss``).

Loss per MoE layer (SiDA-MoE eq. 2): cross-entropy of the predictor's logits against the router's
top-1 expert, plus ``kd_weight`` times a distillation term restricted to the router's top-T experts:
KL(softmax(router top-T logits) || softmax(predictor logits at those T experts)). The paper uses
T=30, kd_weight=0.005, AdamW with lr 5e-5 and batch 64. ``target="topk"`` swaps the top-1 target
for a uniform target over the router's top-k set, which matches what a prefetcher needs (every
chosen expert, not just the first) -- measured in ``benches/predictor_pipeline.py``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict
from typing import Literal

import torch
import torch.nn.functional as F

from sida_moe.predictor.model import HashPredictor
from sida_moe.predictor.config import PredictorConfig
from sida_moe.train.batches import TraceBatches, shifted_targets
from sida_moe.train.configs import TrainConfig
from sida_moe.train.evaluation import evaluate, fit_gate_weights, fit_weight_temperature
from sida_moe.train.step_loop import StepBudget, run_steps
from sida_moe.train.trace_loading import Traces


_DEFAULT_STEPS = 2000  # the step count when neither steps nor max_seconds is given


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 5% at ``total``
    (read at every step, so a ``total`` cut short by a time budget shortens the decay)."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def predictor_config_for(
    manifest: dict,
    hidden: int = 256,
    head_hidden: int = 0,
    attn_blocks: int = 0,
    attn_heads: int = 8,
    target_shift: int = 0,
) -> PredictorConfig:
    """The hash-function sizes for the model a trace was recorded from."""
    return PredictorConfig(
        input_dim=manifest["hidden_size"],
        num_moe_layers=manifest["num_moe_layers"],
        num_experts=manifest["num_experts"],
        top_k=manifest["top_k"],
        hidden=hidden,
        head_hidden=head_hidden,
        attn_blocks=attn_blocks,
        attn_heads=attn_heads,
        target_shift=target_shift,
        moe_layer_ids=list(manifest["moe_layer_ids"]),
        model_type=manifest.get("model_type", ""),
    )


def distillation_loss(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    logit_ids: torch.Tensor,
    logit_vals: torch.Tensor,
    kd_weight: float,
    top_t: int,
    target: Literal["top1", "topk"] = "top1",
) -> torch.Tensor:
    """Truncated-KD loss averaged over layers and tokens.

    ``logits [L, B, S, E]`` (predictor), ``topk_ids [L, B, S, k]`` (experts used),
    ``logit_ids / logit_vals [L, B, S, T']`` (router's largest logits, descending; the first
    ``min(top_t, T')`` are used).
    """
    num_experts = logits.shape[-1]
    flat = logits.float().reshape(-1, num_experts)
    if target == "top1":
        hard = F.cross_entropy(flat, logit_ids[..., 0].reshape(-1))
    else:
        k = topk_ids.shape[-1]
        soft = torch.zeros_like(flat).scatter_(-1, topk_ids.reshape(-1, k), 1.0 / k)
        hard = torch.sum(-soft * F.log_softmax(flat, dim=-1), dim=-1).mean()
    if kd_weight == 0:
        return hard
    t = min(top_t, logit_ids.shape[-1])
    ids = logit_ids[..., :t].reshape(-1, t)
    teacher = F.softmax(logit_vals[..., :t].reshape(-1, t).float(), dim=-1)
    student = F.log_softmax(flat.gather(-1, ids), dim=-1)
    kd = F.kl_div(student, teacher, reduction="batchmean")
    return hard + kd_weight * kd


@contextlib.contextmanager
def _tf32_matmuls(device: torch.device):
    """TF32 matmuls while training on a GPU (cuDNN's LSTM already uses TF32 by default); the
    process-wide setting is restored afterwards."""
    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def train_predictor(
    traces: Traces,
    config: TrainConfig | None = None,
    held_out: Traces | None = None,
    progress: bool = True,
    predictor: HashPredictor | None = None,
    model: torch.nn.Module | None = None,
    hash_routing_sequences: int = 64,
) -> tuple[HashPredictor, dict]:
    """Train a hash function on ``traces``; returns it (eval mode) and a report with the loss curve,
    timing, which limit stopped training (``stopped_by``) and, when ``held_out`` is given,
    ``evaluate``'s metrics on it. With ``model`` (the traced model) and ``held_out`` too, the report's
    ``hash_routing`` holds ``hash_routing_loss`` on the first ``hash_routing_sequences`` held-out
    sequences: what hash routing costs in next-token loss against exact mode."""
    config = config or TrainConfig()
    with _tf32_matmuls(torch.device(config.device)):
        predictor, report = _train(traces, config, held_out, progress, predictor)
    if model is not None and held_out is not None and hash_routing_sequences > 0:
        report["hash_routing"] = hash_routing_loss(model, predictor, held_out.input_ids[:hash_routing_sequences])
    return predictor, report


def hash_routing_loss(
    model: torch.nn.Module,
    predictor: HashPredictor,
    input_ids: torch.Tensor,
    weights: tuple[str, ...] = ("predicted", "router"),
    batch_size: int = 16,
) -> dict:
    """Mean next-token loss (and perplexity) of ``model`` on ``input_ids [N, S]`` in exact mode and
    under hash routing (``HashRouting``) with each weight source of ``weights``: ``{"tokens",
    "exact": {"loss", "perplexity"}, "<weights>": {"loss", "perplexity", "relative_increase"}}``.
    The predictor runs on the model's device for the measurement and goes back where it was."""
    from sida_moe.predictor.hash_routing import HashRouting

    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [sequences >= 1, tokens >= 2], got {list(input_ids.shape)}")
    device = next(model.parameters()).device
    home = predictor.compress.weight.device
    predictor.to(device).eval()

    def mean_loss() -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, input_ids.shape[0], batch_size):
                x = input_ids[i : i + batch_size].to(device, torch.long)
                logits = model(input_ids=x).logits[:, :-1].float()
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
                count += x[:, 1:].numel()
        return total / count

    try:
        exact = mean_loss()
        out: dict = {"tokens": int(input_ids.numel()), "exact": {"loss": exact, "perplexity": math.exp(exact)}}
        for source in weights:
            with HashRouting(model, predictor, weights=source):
                loss = mean_loss()
            out[source] = {"loss": loss, "perplexity": math.exp(loss), "relative_increase": loss / exact - 1.0}
    finally:
        predictor.to(home)
    return out


def _train(
    traces: Traces, config: TrainConfig, held_out: Traces | None, progress: bool, predictor: HashPredictor | None
) -> tuple[HashPredictor, dict]:
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    hidden, head_hidden = config.widths(traces.manifest["hidden_size"])
    model = predictor or HashPredictor(
        predictor_config_for(traces.manifest, hidden=hidden, head_hidden=head_hidden, attn_blocks=config.attn_blocks,
                             attn_heads=config.attn_heads, target_shift=config.target_shift)
    )
    if model.config.target_shift != config.target_shift:
        raise ValueError(f"the predictor given predicts {model.config.target_shift} tokens ahead, the config "
                         f"asks for {config.target_shift} (TrainConfig.target_shift)")
    if config.target_shift and traces.input_ids.shape[1] <= config.target_shift:
        raise ValueError(f"target_shift={config.target_shift} needs sequences longer than it, the trace's have "
                         f"{traces.input_ids.shape[1]} tokens")
    if model.config.num_experts != traces.manifest["num_experts"] or model.config.num_moe_layers != traces.manifest["num_moe_layers"]:
        raise ValueError("predictor sizes do not match the trace's model (num_experts / num_moe_layers)")
    dropout, model.dropout = model.dropout, config.dropout  # training only: given back below
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    # steps None with max_seconds: the time budget alone decides
    budget = StepBudget(config.steps if config.steps is not None else (None if config.max_seconds else _DEFAULT_STEPS),
                        config.max_seconds)
    bf16 = config.use_bf16()

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, config.warmup_steps, budget.total))
    gen = torch.Generator().manual_seed(config.seed)
    batches = TraceBatches(traces, device, config.top_t)
    n = traces.num_sequences

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step_loss() -> torch.Tensor:
        rows = torch.randint(0, n, (min(config.batch_size, n),), generator=gen)
        embeds, topk_ids, logit_ids, logit_vals = shifted_targets(batches(rows), config.target_shift)
        with amp():
            logits, _ = model(embeds)
        # the loss works in float32
        return distillation_loss(logits.float(), topk_ids, logit_ids, logit_vals, config.kd_weight, config.top_t, config.target)

    run = run_steps(budget, step_loss, opt, sched, model.parameters(), config.grad_clip, "train-predictor", progress)
    losses = run.losses
    model.eval()
    model.dropout = dropout
    report: dict = {
        "train_config": asdict(config),
        # which limit ended training: "steps" (the step count, before any max_seconds ran out) or
        # "max_seconds" (the time budget); with both given, a "steps" stop left time unused
        "stopped_by": run.stopped_by,
        "step_limit": budget.cap,
        "bf16": bf16,
        "predictor_config": asdict(model.config),
        "num_parameters": model.num_parameters(),
        "train_sequences": n,
        "train_seconds": run.seconds,
        "steps_run": run.steps,
        "trace_on_device": batches.resident,
        "loss_first": losses[0],
        "loss_last_50": sum(losses[-50:]) / len(losses[-50:]),
        "loss_curve": losses[:: max(1, len(losses) // 100)],
    }
    # fitted on training sequences; the held-out report then measures them on unseen text
    fit_on = traces.subset(slice(0, min(512, traces.num_sequences)))
    # the gate correction and hash routing's temperature refine a token's own routing: not for a
    # predictor of the next token's
    if config.fit_gate and traces.gate_ids is not None and traces.manifest["num_moe_layers"] > 1 \
            and not config.target_shift:
        report["gate_fit"] = fit_gate_weights(model, fit_on, device=config.device)
    if config.fit_temperature and not config.target_shift:
        report["temperature_fit"] = fit_weight_temperature(model, fit_on, device=config.device)
    report["predictor_config"] = asdict(model.config)  # with what the fits stored in it
    if held_out is not None:
        report["held_out"] = evaluate(model, held_out, device=config.device)
    return model, report


__all__ = ["distillation_loss", "hash_routing_loss", "predictor_config_for", "train_predictor"]
