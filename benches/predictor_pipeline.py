"""End-to-end predictor measurement on a trained MoE LM (run on the H100; JSON under --out).

1. trains the reference model (``train_reference_model.py``: Qwen3-MoE, 8 layers, 32 experts top-4,
   on the Python standard library) unless ``--model`` points at one;
2. records routing traces on training files and on held-out files (``record_traces``);
3. trains hash-function variants (the paper's loss at a tuned lr and at the paper's lr 5e-5, and the
   stronger variants); a variant named ``NAME+ext`` trains on a larger trace: the training files
   plus ``--extra-corpus`` (default: this interpreter's site-packages, files copying held-out text
   skipped), which the model never saw -- the predictor learns the model's routing, not the text;
4. reports per-layer top-k recall / precision on held-out text; trains each variant's lookahead
   heads (``--lookahead-hidden``; router inputs of every ``--moe-inputs-every``-th training sequence
   are traced) and reports the recall once the layer before has run;
5. hash routing: held-out loss vs exact mode, for predicted and router weights;
6. cost: predictor time per decoded token (incremental, batch 1) vs the model's decode step;
7. cache simulation at a 25% expert budget (``sida_moe.train.cachesim``): LRU vs prediction.

    python benches/predictor_pipeline.py --out $OUT            # GPU, about 6 minutes
    python benches/predictor_pipeline.py --out /tmp/x --smoke  # CPU smoke test, tiny random model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor_common import import_predictor_package  # noqa: E402

HAS_NATIVE = import_predictor_package()

from sida_moe.train.cachesim import simulate_all  # noqa: E402
from sida_moe.predictor.hash_routing import HashRouting  # noqa: E402
from sida_moe.train.configs import LookaheadConfig, TrainConfig  # noqa: E402
from sida_moe.train.lookahead import evaluate_lookahead, train_lookahead  # noqa: E402
from sida_moe.predictor.model import HashPredictor  # noqa: E402
from sida_moe.train.traces import record_traces  # noqa: E402
from sida_moe.train.trace_loading import load_traces  # noqa: E402
from sida_moe.train.evaluation import evaluate  # noqa: E402
from sida_moe.train.predictor_training import train_predictor  # noqa: E402

import train_reference_model as ref  # noqa: E402


VARIANTS: dict[str, dict] = {
    "paper_loss_lr1e-3": {"target": "top1", "lr": 1e-3},
    "paper_loss_lr5e-5": {"target": "top1", "lr": 5e-5},
    "topk": {"target": "topk", "lr": 1e-3},
    "topk_kd0.5": {"target": "topk", "lr": 1e-3, "kd_weight": 0.5},
    # wider networks (session 2): the paper's width is 256 with linear heads
    "topk_kd0.5_h512": {"target": "topk", "lr": 1e-3, "kd_weight": 0.5, "hidden": 512},
    "topk_kd0.5_mlp": {"target": "topk", "lr": 1e-3, "kd_weight": 0.5, "head_hidden": 256},
    "topk_kd0.5_h512_mlp": {"target": "topk", "lr": 1e-3, "kd_weight": 0.5, "hidden": 512, "head_hidden": 256},
    # deep variant (session 3): causal transformer blocks on top of the paper's features
    "topk_kd0.5_h512_mlp_b2": {"target": "topk", "lr": 1e-3, "kd_weight": 0.5, "hidden": 512, "head_hidden": 256,
                               "attn_blocks": 2},
    "topk_kd0.5_h512_mlp_b4": {"target": "topk", "lr": 1e-3, "kd_weight": 0.5, "hidden": 512, "head_hidden": 256,
                               "attn_blocks": 4},
    "topk_kd0.5_h512_mlp_b4_bs128": {"target": "topk", "lr": 1.5e-3, "kd_weight": 0.5, "hidden": 512,
                                    "head_hidden": 256, "attn_blocks": 4, "batch_size": 128},
    "topk_kd0.5_h256_mlp_b4": {"target": "topk", "lr": 1e-3, "kd_weight": 0.5, "hidden": 256, "head_hidden": 256,
                               "attn_blocks": 4},
    # session 4: bf16 autocast makes a batch of 128 cost what 64 did (predictor_train_speed.py), so a
    # training budget buys twice the tokens per step at the same step count
    "topk_kd0.5_h512_mlp_b2_bs128_bf16": {"target": "topk", "lr": 1.5e-3, "kd_weight": 0.5, "hidden": 512,
                                          "head_hidden": 256, "attn_blocks": 2, "batch_size": 128, "bf16": True},
    "topk_kd0.5_h512_mlp_b2_bs256_bf16": {"target": "topk", "lr": 2e-3, "kd_weight": 0.5, "hidden": 512,
                                          "head_hidden": 256, "attn_blocks": 2, "batch_size": 256, "bf16": True},
    # session 7: dropout in the network (it scores 0.90 on its training text, 0.87 held-out)
    "topk_kd0.5_h512_mlp_b2_bs128_bf16_do0.1": {"target": "topk", "lr": 1.5e-3, "kd_weight": 0.5, "hidden": 512,
                                                "head_hidden": 256, "attn_blocks": 2, "batch_size": 128, "bf16": True,
                                                "dropout": 0.1},
    "topk_kd0.5_h512_mlp_b2_bs128_bf16_do0.2": {"target": "topk", "lr": 1.5e-3, "kd_weight": 0.5, "hidden": 512,
                                                "head_hidden": 256, "attn_blocks": 2, "batch_size": 128, "bf16": True,
                                                "dropout": 0.2},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_setting(current, text: str):
    """``text`` as a value of the type of ``current`` (a LookaheadConfig field); booleans read
    1/0, true/false, yes/no."""
    if isinstance(current, bool):
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise SystemExit(f"--lookahead-extra: {text!r} is not a boolean (1/0, true/false, yes/no)")
        return text.lower() in ("1", "true", "yes")
    return type(current)(text)


def log_lookahead(name: str, what: str, report: dict, trace, pred: HashPredictor, k: int) -> None:
    """Log (and add to ``report``) the heads' held-out recall and their recall on training text: a gap
    between the two says the heads overfit their data."""
    seen = trace.with_moe_inputs()
    fit = evaluate_lookahead(pred, seen.subset(slice(0, min(200, seen.num_sequences))), device=report["config"]["device"])
    report["train_subset"] = {key: val for key, val in fit.items() if key != "per_layer"}
    lh = report["held_out"]
    log(f"  {name}: {what} ({report['steps_run']} steps on {report['train_tokens']} tokens, "
        f"{report['train_seconds']:.0f}s): held-out recall@{k} {lh[f'mean_recall@{k}']:.4f} -> "
        f"{lh[f'mean_lookahead_recall@{k}']:.4f} once the layer before has run (training text: "
        f"{fit[f'mean_lookahead_recall@{k}']:.4f}); per layer "
        + " ".join(f"{r[f'lookahead_recall@{k}']:.3f}" for r in lh["per_layer"])
        + f"; prompt tokens (no previous state) {lh[f'mean_prompt_lookahead_recall@{k}']:.4f}")


def held_out_loss(model, ids: torch.Tensor, batch: int = 16) -> float:
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            x = ids[i : i + batch].to(dev)
            out = model(input_ids=x, labels=x)
            n = x.numel() - x.shape[0]
            total += float(out.loss) * n
            count += n
    return total / count


def time_predictor_step(predictor: HashPredictor, embeds: torch.Tensor, steps: int) -> float:
    """Seconds per token of incremental (decode) prediction, batch 1."""
    dev = embeds.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        state = None
        for i in range(8):  # warm-up
            _, state = predictor(embeds[:, i : i + 1], state)
        sync()
        t0 = time.perf_counter()
        state = None
        for i in range(steps):
            logits, state = predictor(embeds[:, i : i + 1], state)
            logits.topk(predictor.config.top_k, dim=-1)
        sync()
    return (time.perf_counter() - t0) / steps


def time_decode_step(model, prompt: torch.Tensor, steps: int) -> float:
    """Seconds per decode step (batch 1, KV cache) of the model, all on its device."""
    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for rep in range(2):  # first repetition warms up
            out = model(input_ids=prompt.to(dev), use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="a trained MoE model directory (default: train one)")
    ap.add_argument("--work", default="/tmp/sida-predictor-work")
    ap.add_argument("--train-seconds", type=float, default=150.0)
    ap.add_argument("--trace-seq-len", type=int, default=256)
    ap.add_argument("--train-sequences", type=int, default=100000)
    ap.add_argument("--held-out-sequences", type=int, default=200)
    ap.add_argument("--predictor-steps", type=int, default=4000)
    ap.add_argument("--predictor-seconds", type=float, default=60.0, help="training time cap per variant")
    ap.add_argument("--variants", default="topk,topk_kd0.5",
                    help=f"comma-separated, from {sorted(VARIANTS)}; NAME+ext trains on the extended trace")
    ap.add_argument("--extra-corpus", default="site-packages",
                    help="'site-packages' or comma-separated directories of .py files for the +ext variants' trace")
    ap.add_argument("--extra-tokens", type=int, default=8_000_000, help="tokens of the extra corpus to trace")
    ap.add_argument("--lookahead-hidden", type=int, default=1024, help="lookahead heads' width (0: none)")
    ap.add_argument("--lookahead-seconds", type=float, default=45.0, help="training time cap of the heads per variant")
    ap.add_argument("--lookahead-crossfit", type=float, default=0.0,
                    help="seconds to train each cross-fit network: the sequences with router inputs are split in "
                         "--lookahead-folds folds, a network of the variant is trained without each, and the heads "
                         "train on every fold with that network's logits; those heads are kept (0: off, the heads "
                         "see the predictor's own logits)")
    ap.add_argument("--lookahead-extra", default="",
                    help="heads settings to compare first, ';'-separated, each 'field=value,...' of LookaheadConfig "
                         "(e.g. 'hidden=1024;weight_decay=0.1'); reported under lookahead_extra, not kept")
    ap.add_argument("--lookahead-folds", type=int, default=2, help="folds of --lookahead-crossfit (>= 2)")
    ap.add_argument("--lookahead-compare", action="store_true",
                    help="with --lookahead-crossfit, also train (and report) heads the plain way first")
    ap.add_argument("--moe-inputs-every", type=int, default=6,
                    help="trace the router inputs of every N-th training sequence (the heads' data; held-out: all)")
    ap.add_argument("--decode", action="store_true", help="also decode held-out prompts through the offload engine")
    ap.add_argument("--decode-prompts", type=int, default=4)
    ap.add_argument("--prefetch-k", type=int, default=0, help="also decode with this many predicted experts per layer")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sim-sequences", type=int, default=24)
    ap.add_argument("--budget", type=float, default=0.25, help="expert cache budget as a fraction of all experts")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny random model, few steps")
    ap.add_argument("--held-out-text", default=None, help="also write the held-out files here, as one text file "
                    "(prompts for `sida-moe bench --prompt-file`)")
    args = ap.parse_args()
    if args.lookahead_crossfit and args.lookahead_folds < 2:
        ap.error(f"--lookahead-folds must be >= 2, got {args.lookahead_folds}")
    os.makedirs(args.out, exist_ok=True)

    def dump(res: dict) -> None:
        with open(os.path.join(args.out, "predictor_pipeline.json"), "w") as f:
            json.dump(res, f, indent=2)
    os.makedirs(args.work, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                     "torch": torch.__version__, "native_runtime": HAS_NATIVE, "args": vars(args)}
    t_start = time.perf_counter()

    # ---- 1. model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.smoke:
        train_docs, held_docs = ref.load_stdlib_split()
        train_docs, held_docs = train_docs[:40], held_docs[:10]
        tokenizer = ref.train_tokenizer([t for _, t in train_docs], vocab_size=512)
        model = ref.build_model(len(tokenizer), tokenizer.eos_token_id, layers=3, experts=8, top_k=2)
        model.config.output_router_logits = False
        model_dir = os.path.join(args.work, "smoke-model")
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    else:
        model_dir = args.model or os.path.join(args.work, "ref-moe")
        if args.model is None:
            log("training the reference model")
            results["reference_model"] = ref.main(["--out", model_dir, "--seconds", str(args.train_seconds)])
            results["reference_model"].pop("held_out_files", None)
        train_docs, held_docs = ref.load_stdlib_split()
    if args.held_out_text:
        with open(args.held_out_text, "w") as f:
            f.write("\n\n".join(text for _, text in held_docs))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    if not args.smoke:
        try:
            model.set_experts_implementation("grouped_mm")
        except Exception as exc:  # noqa: BLE001
            log(f"grouped_mm unavailable ({exc}); eager experts")
    results["t_model_ready_s"] = time.perf_counter() - t_start

    # ---- 2. traces
    seq = args.trace_seq_len
    train_ids = ref.tokenize(tokenizer, train_docs, seq)
    held_ids = ref.tokenize(tokenizer, held_docs, seq)
    g = torch.Generator().manual_seed(0)
    train_ids = train_ids[torch.randperm(train_ids.shape[0], generator=g)[: args.train_sequences]]
    held_ids = held_ids[torch.randperm(held_ids.shape[0], generator=g)[: args.held_out_sequences]]
    log(f"tracing {train_ids.shape[0]} train and {held_ids.shape[0]} held-out sequences of {seq} tokens")
    t0 = time.perf_counter()
    every = args.moe_inputs_every if args.lookahead_hidden else 0
    record_traces(model, train_ids, os.path.join(args.work, "trace-train"), batch_size=32, progress=False,
                  moe_inputs_every=every)
    record_traces(model, held_ids, os.path.join(args.work, "trace-held"), batch_size=32, progress=False,
                  moe_inputs_every=1 if every else 0)
    results["trace_seconds"] = time.perf_counter() - t0
    names = args.variants.split(",")
    for name in names:
        if name.removesuffix("+ext") not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {sorted(VARIANTS)} (optionally with +ext)")
    extended = None
    if any(name.endswith("+ext") for name in names):
        t0 = time.perf_counter()
        roots = ref.site_packages_dirs() if args.extra_corpus == "site-packages" else args.extra_corpus.split(",")
        # about 3.5 characters per token on Python source with this tokenizer: read a little more
        extra_docs, extra_info = ref.load_extra_corpus(roots, held_docs, int(args.extra_tokens * 4.5))
        extra_ids = ref.tokenize(tokenizer, extra_docs, seq)[: max(1, args.extra_tokens // seq)]
        log(f"tracing {extra_ids.shape[0]} extra sequences from {extra_info['files']} files under {roots}")
        record_traces(model, extra_ids, os.path.join(args.work, "trace-extra"), batch_size=32, progress=False)
        extended = load_traces(os.path.join(args.work, "trace-train"), os.path.join(args.work, "trace-extra"), compact=True)
        results["extra_corpus"] = {**extra_info, "sequences": int(extra_ids.shape[0]), "tokens": int(extra_ids.numel()),
                                   "extended_trace_sequences": extended.num_sequences,
                                   "seconds": time.perf_counter() - t0}
        del extra_docs, extra_ids
    tr = load_traces(os.path.join(args.work, "trace-train"), compact=True)
    ho = load_traces(os.path.join(args.work, "trace-held"))
    results["trace_manifest"] = {k: v for k, v in tr.manifest.items() if k != "shards"}
    dump(results)

    # ---- 3-4. predictor variants
    predictors: dict[str, HashPredictor] = {}
    results["variants"] = {}
    for name in names:
        spec = dict(VARIANTS[name.removesuffix("+ext")])
        if device == "cpu":
            spec.pop("bf16", None)  # autocast is a GPU speed-up; the CPU smoke run trains in float32
        # every variant is written as changes to the paper's configuration
        cfg = TrainConfig.preset("paper", device=device, steps=5 if args.smoke else args.predictor_steps,
                                 max_seconds=None if args.smoke else args.predictor_seconds, **spec)
        train_trace = extended if name.endswith("+ext") else tr
        log(f"training predictor {name} on {train_trace.num_sequences} sequences "
            f"(at most {cfg.steps} steps / {cfg.max_seconds} s)")
        pred, rep = train_predictor(train_trace, cfg, held_out=ho, progress=False)
        predictors[name] = pred
        rep.pop("loss_curve", None)
        # recall on training sequences too: a gap to held-out says overfitting, none says capacity
        fit = evaluate(pred, tr.subset(slice(0, min(200, tr.num_sequences))), device=device)
        rep["train_subset"] = {key: val for key, val in fit.items() if key != "per_layer"}
        results["variants"][name] = rep
        dump(results)
        k = rep["held_out"]["k"]
        if args.lookahead_hidden and tr.moe_inputs is not None:
            look = LookaheadConfig(hidden=args.lookahead_hidden, steps=5 if args.smoke else 50000, batch_tokens=8192,
                                   max_seconds=None if args.smoke else args.lookahead_seconds, device=device)
            extra = []
            for spec in filter(None, args.lookahead_extra.split(";")):
                fields = dict(item.split("=", 1) for item in spec.split(","))
                unknown = set(fields) - set(vars(look))
                if unknown:
                    raise SystemExit(f"--lookahead-extra: {sorted(unknown)} are not LookaheadConfig fields")
                alt = replace(look, **{f: parse_setting(getattr(look, f), v) for f, v in fields.items()})
                extra.append({"settings": fields, **train_lookahead(pred, tr, alt, held_out=ho, progress=False)})
                log_lookahead(name, f"lookahead heads with {spec}", extra[-1], tr, pred, k)
            if extra:
                rep["lookahead_extra"] = extra
            if not args.lookahead_crossfit or args.lookahead_compare:
                rep["lookahead"] = train_lookahead(pred, tr, look, held_out=ho, progress=False)
                log_lookahead(name, "lookahead heads", rep["lookahead"], tr, pred, k)
            if args.lookahead_crossfit:
                # cross-fitting: the sequences with router inputs are split into folds; each fold's run-ahead
                # logits come from a network trained on every other sequence, as poor as on unseen text
                rows, folds = tr.moe_input_rows.long(), args.lookahead_folds
                bare = replace(tr, moe_inputs=None, moe_input_rows=None)
                fold_cfg = replace(cfg, max_seconds=None if args.smoke else args.lookahead_crossfit)
                parts, nets, fold_reports = [], [], []
                for j in range(folds):
                    others = torch.ones(tr.num_sequences, dtype=torch.bool)
                    others[rows[j::folds]] = False
                    log(f"  {name}: cross-fit network {j + 1}/{folds} on {int(others.sum())} sequences "
                        f"({fold_cfg.max_seconds} s)")
                    net, fold_rep = train_predictor(bare.subset(others.nonzero().flatten()), fold_cfg, held_out=ho,
                                                    progress=False)
                    parts.append(tr.subset(rows[j::folds]))
                    nets.append(net)
                    fold_reports.append({"sequences": int(others.sum()), "steps_run": fold_rep["steps_run"],
                                         "train_seconds": fold_rep["train_seconds"],
                                         f"held_out_mean_recall@{k}": fold_rep["held_out"][f"mean_recall@{k}"]})
                crossfit = train_lookahead(pred, parts, look, held_out=ho, progress=False, base=nets)
                crossfit["fold_networks"] = fold_reports
                rep["lookahead_crossfit"] = crossfit
                log_lookahead(name, f"cross-fitted lookahead heads ({folds} folds)", crossfit, parts[0], pred, k)
                del parts, nets, bare
            dump(results)
        log(f"  {name}: {rep['steps_run']} steps, held-out mean recall@{k} {rep['held_out'][f'mean_recall@{k}']:.4f}"
            f", recall@{2 * k} {rep['held_out'][f'mean_recall@{2 * k}']:.4f}"
            + (f", next-layer gate alone {rep['held_out'][f'mean_gate_recall@{k}']:.4f}, fused "
               f"{rep['held_out'][f'mean_fused_recall@{k}']:.4f} (weights {rep['gate_fit']['gate_weights']})"
               if f"mean_fused_recall@{k}" in rep["held_out"] else "")
            + f" ({rep['train_seconds']:.0f}s)")
    k = ho.manifest["top_k"]
    best_name = max(predictors, key=lambda n: results["variants"][n]["held_out"][f"mean_recall@{k}"])
    best = predictors[best_name]
    results["best_variant"] = best_name

    # ---- 5. hash routing fidelity
    log("hash routing fidelity")
    eval_ids = held_ids[: min(64, held_ids.shape[0])]
    fid = {"exact_loss": held_out_loss(model, eval_ids), "tokens": int(eval_ids.numel())}
    for name in predictors:
        pred = predictors[name].to(device)
        fitted = list(pred.config.weight_temperature)
        # "predicted": at the fitted per-layer temperature; "predicted_t1": the raw softmax (before session 7)
        for label, weights, temps in (("predicted", "predicted", fitted), ("predicted_t1", "predicted", []),
                                      ("router", "router", fitted)):
            if label == "predicted_t1" and not fitted:
                continue
            pred.config.weight_temperature = temps
            with HashRouting(model, pred, weights=weights):
                loss = held_out_loss(model, eval_ids)
            fid[f"{name}/{label}"] = {"loss": loss, "relative_increase": loss / fid["exact_loss"] - 1.0}
        pred.config.weight_temperature = fitted
        fid[f"{name}/weight_temperature"] = fitted
    results["hash_routing"] = fid
    dump(results)

    # ---- 6. cost per token
    log("cost per token")
    emb = model.get_input_embeddings()(held_ids[:1, :128].to(device)).float()
    cost = {"variant": best_name, "predictor_params": best.num_parameters(),
            "predictor_step_s_device": time_predictor_step(best.to(device), emb, 96)}
    cost["predictor_step_s_cpu"] = time_predictor_step(best.to("cpu"), emb.cpu(), 96)
    best.to(device)
    cost["model_decode_step_s"] = time_decode_step(model, held_ids[:1, :32], 16 if args.smoke else 64)
    cost["ratio_device"] = cost["predictor_step_s_device"] / cost["model_decode_step_s"]
    cost["ratio_cpu"] = cost["predictor_step_s_cpu"] / cost["model_decode_step_s"]
    results["cost_per_token"] = cost
    dump(results)

    # ---- 7. cache simulation at the budget
    log("cache simulation")
    sim = ho.subset(slice(0, min(args.sim_sequences, ho.num_sequences)))
    num_experts, L = ho.manifest["num_experts"], ho.manifest["num_moe_layers"]
    slots = max(k, int(round(args.budget * num_experts * L)))
    with torch.no_grad():
        embeds = sim.embeddings[sim.input_ids].to(device=device, dtype=torch.float32)
        sims = {}
        for name, p in predictors.items():
            logits, _ = p(embeds)
            sims[name] = simulate_all(sim.topk_ids, logits.topk(k, dim=-1).indices.cpu(), slots)
    results["cache_simulation"] = {"num_slots": slots, "budget": args.budget, "sequences": sim.num_sequences, **sims}
    dump(results)

    # ---- 8. real decode through the offload engine (needs the native runtime)
    if args.decode and HAS_NATIVE:
        log(f"decode through the offload engine with predictor {best_name}")
        from predictor_decode import run_decode_bench

        from sida_moe.prefetchers import make_prefetcher
        from sida_moe.predictor.prefetcher import SidaPrefetcher

        def make(spec):
            if isinstance(spec, dict):
                return SidaPrefetcher(best, **spec)  # moves the predictor to the model's device
            return make_prefetcher(spec)

        configs = [
            {"name": "lru/none", "policy": "lru", "prefetch": "none"},
            {"name": "lru/next_layer_gate", "policy": "lru", "prefetch": "next_layer_gate"},
            {"name": "lru/sida", "policy": "lru", "prefetch": {"feed_future": False}},
            {"name": "predictive/sida", "policy": "predictive", "prefetch": {}},
        ]
        if args.prefetch_k:
            # more experts per layer than the router picks: the cache simulation says recall (and the
            # hit rate) climbs faster than the wasted copies cost at this budget
            configs.append({"name": f"predictive/sida(k={args.prefetch_k})", "policy": "predictive",
                            "prefetch": {"k": args.prefetch_k}})
        prompts = [held_ids[i : i + 1, : args.prompt_tokens] for i in range(args.decode_prompts)]
        results["decode"] = run_decode_bench(model, prompts, args.new_tokens, args.budget, configs, make)
        dump(results)

    # ---- artifacts
    for name in list(predictors)[:2]:
        d = os.path.join(args.work, f"predictor-{name}")
        predictors[name].save(d)
        for fname in ("predictor.safetensors", "predictor.json"):
            os.replace(os.path.join(d, fname), os.path.join(args.out, f"{name}.{fname}"))
    from safetensors.torch import save_file

    save_file({"input_ids": sim.input_ids.to(torch.int32).contiguous(), "topk_ids": sim.topk_ids.to(torch.int16).contiguous(),
               "embeddings": ho.embeddings.contiguous()}, os.path.join(args.out, "heldout_routing.safetensors"))
    results["total_seconds"] = time.perf_counter() - t_start
    with open(os.path.join(args.out, "predictor_pipeline.json"), "w") as f:
        json.dump(results, f, indent=2)
    log(f"done in {results['total_seconds']:.0f}s")
    print(json.dumps({k: results.get(k) for k in ("hash_routing", "cost_per_token", "decode")}, indent=1)[:8000])


if __name__ == "__main__":
    main()
