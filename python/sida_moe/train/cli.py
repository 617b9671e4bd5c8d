"""``sida-moe trace`` and ``sida-moe train-predictor`` (registered with ``sida_moe.cli``).

    sida-moe trace --model ./my-moe --corpus /usr/lib/python3.12 --split train --out ./trace-train
    sida-moe trace --model ./my-moe --corpus /usr/lib/python3.12 --split held-out --out ./trace-held
    sida-moe train-predictor --trace ./trace-train --held-out ./trace-held --out ./my-moe

With ``trace --moe-inputs-every N`` (router inputs of every N-th sequence kept), ``train-predictor``
also trains the lookahead heads (``--lookahead-hidden``, 0 to skip), which correct each layer's
prediction once the layer before it has run.
"""

from __future__ import annotations

import argparse
import json
import os

from sida_moe.cli import (UserError, device_arg, non_negative_float, non_negative_int, open_fraction, positive_float,
                          positive_int, user_errors)


def _configure_trace(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="transformers (>= 5) MoE checkpoint directory or hub id")
    p.add_argument("--corpus", required=True, help="a text file, or a directory of .py/.txt/.md/.rst files")
    p.add_argument("--out", required=True, help="trace directory to write")
    p.add_argument("--split", default="all", choices=["all", "train", "held-out"],
                   help="which files of the corpus: a stable path hash puts --held-out-fraction of them in held-out")
    p.add_argument("--held-out-fraction", type=open_fraction, default=0.05,
                   help="share of the corpus' files in the held-out split (default 0.05)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per traced sequence (default 256)")
    p.add_argument("--max-sequences", type=positive_int, default=None, help="trace at most this many sequences (random subset)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward of the model (default 8)")
    p.add_argument("--top-t", type=positive_int, default=30, help="router logits kept per token and layer")
    p.add_argument("--no-next-layer-gate", action="store_true",
                   help="do not record each layer's router on the previous layer's input (the fused "
                        "correction of train-predictor needs it; it costs one router matmul per layer)")
    p.add_argument("--moe-inputs-every", type=non_negative_int, default=0, metavar="N",
                   help="also keep the router inputs of every N-th sequence (2 x hidden x (MoE layers - 1) bytes "
                        "per token), so train-predictor can train the lookahead heads; 0 (default): none")
    p.add_argument("--device", default=None, type=device_arg, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="the model's dtype while tracing (default: bfloat16 on a GPU, else float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-sequences subset (default 0)")


def run_trace(args: argparse.Namespace) -> int:
    """Tokenize the corpus, run the model over it and write the routing trace."""
    import torch
    from transformers import AutoModelForCausalLM

    from sida_moe.train.traces import chunk_token_ids, read_corpus, record_traces, split_held_out

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with user_errors("--corpus", args.corpus):
        docs = read_corpus(args.corpus)
    if args.split != "all":
        train, held = split_held_out(docs, args.held_out_fraction)
        docs = train if args.split == "train" else held
        if not docs:
            raise UserError(f"the {args.split} split of {args.corpus!r} is empty; change --held-out-fraction")
    with user_errors(f"cannot load the tokenizer of {args.model}"):
        tokenize, eos = _trace_tokenizer(args.model)
    ids = tokenize([text for _, text in docs])
    if not any(ids) and any(text for _, text in docs):
        raise UserError(f"the tokenizer of {args.model} turned the {len(docs)} files of {args.corpus!r} into no tokens "
                        "at all: it has no vocabulary (save the model's tokenizer beside it)")
    with user_errors("--corpus", args.corpus):
        sequences = chunk_token_ids(ids, args.seq_len, separator=eos)
    if args.max_sequences is not None and sequences.shape[0] > args.max_sequences:
        g = torch.Generator().manual_seed(args.seed)
        sequences = sequences[torch.randperm(sequences.shape[0], generator=g)[: args.max_sequences]]
    with user_errors(f"cannot load the checkpoint {args.model}"):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    print(f"tracing {sequences.shape[0]} sequences of {args.seq_len} tokens from {len(docs)} files on {device}")
    manifest = record_traces(model, sequences, args.out, batch_size=args.batch_size, top_t=args.top_t,
                             model_name_or_path=args.model, next_layer_gate=not args.no_next_layer_gate,
                             moe_inputs_every=args.moe_inputs_every)
    print(f"wrote {args.out}: {manifest['num_moe_layers']} MoE layers, {manifest['num_experts']} experts, "
          f"top-{manifest['top_k']}, {manifest['num_sequences'] * manifest['seq_len']} tokens")
    return 0


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _trace_tokenizer(model: str):
    """(texts -> token id lists, eos id) of the checkpoint's tokenizer; for a checkpoint directory
    that ships none, UTF-8 bytes (the byte tokenizer ``generate`` falls back to), said on stderr."""
    import sys

    if os.path.isdir(model) and not any(os.path.exists(os.path.join(model, f)) for f in _TOKENIZER_FILES):
        from transformers import AutoConfig

        from sida_moe.byte_tokenizer import ByteTokenizer

        config = AutoConfig.from_pretrained(model)
        vocab = getattr(config.get_text_config(), "vocab_size", None) or 0
        need = 256 + ByteTokenizer.offset
        if vocab < need:
            raise UserError(f"{model} ships no tokenizer ({', '.join(_TOKENIZER_FILES)}) and its vocabulary of {vocab} "
                            f"tokens is too small for the built-in byte tokenizer (needs {need}): save the model's "
                            "tokenizer beside it")
        print(f"{model} ships no tokenizer: tracing the corpus as UTF-8 bytes (the byte tokenizer that "
              "`sida-moe generate` uses for it)", file=sys.stderr)
        byte = ByteTokenizer()
        return (lambda texts: [byte.encode(t) for t in texts]), byte.eos_token_id
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return (lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]), tokenizer.eos_token_id


def _dropout(text: str) -> float:
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _configure_train(p: argparse.ArgumentParser) -> None:
    from sida_moe.train.configs import TRAIN_PRESETS, LookaheadConfig, TrainConfig

    d, look = TrainConfig(), LookaheadConfig()
    p.add_argument("--trace", required=True, help="trace directory of training text (sida-moe trace)")
    p.add_argument("--held-out", default=None, help="trace directory of held-out text for the evaluation report")
    p.add_argument("--out", default=None, help="where to save predictor.json/.safetensors (default: the traced model's directory)")
    p.add_argument("--preset", default="best", choices=sorted(TRAIN_PRESETS),
                   help="best (default): the variant measured best (top-k target, kd 0.5, MLP heads, 2 attention "
                        "blocks, widths scaled to the model); paper: SiDA-MoE's network and loss. The flags below "
                        "override single settings")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="step limit (default: 2000 steps, or with --max-seconds as many as fit in it)")
    p.add_argument("--max-seconds", type=positive_float, default=None, help="training time budget (the step count is fitted to it)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"sequences per step (best: {d.batch_size}, paper: {TRAIN_PRESETS['paper']['batch_size']})")
    p.add_argument("--lr", type=positive_float, default=None,
                   help=f"AdamW learning rate, warm-up then cosine decay (best: {d.lr:g}; the paper's is 5e-5)")
    p.add_argument("--kd-weight", type=non_negative_float, default=None,
                   help=f"weight of the distillation term on the router's top-T logits (best: {d.kd_weight:g}, "
                        f"paper: {TRAIN_PRESETS['paper']['kd_weight']:g})")
    p.add_argument("--top-t", type=positive_int, default=None,
                   help=f"router logits the distillation term matches per token and layer (default {d.top_t}, "
                        "at most what the trace kept)")
    p.add_argument("--target", default=None, choices=["top1", "topk"],
                   help="top1: the paper's loss; topk: uniform target over the router's top-k set")
    p.add_argument("--hidden", type=positive_int, default=None,
                   help="predictor width (best: the model's hidden size rounded up to a power of two, 64..512)")
    p.add_argument("--head-hidden", type=non_negative_int, default=None,
                   help="> 0: per-layer MLP heads of this width, 0: the paper's linear heads (best: half of --hidden)")
    p.add_argument("--attn-blocks", type=non_negative_int, default=None,
                   help="causal transformer blocks on top of the paper's network (best: 2, paper: 0)")
    p.add_argument("--attn-heads", type=positive_int, default=None,
                   help=f"attention heads of those blocks (default {d.attn_heads}; must divide the width)")
    p.add_argument("--dropout", type=_dropout, default=None,
                   help="dropout in the network while training, against overfitting a small corpus (default 0; "
                        "not saved with the predictor)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the forward (default: on when training on a GPU)")
    p.add_argument("--no-fit-temperature", action="store_true",
                   help="do not fit hash routing's per-layer weight temperature after training")
    p.add_argument("--lookahead-hidden", type=non_negative_int, default=None,
                   help="width of the lookahead heads, trained when the trace holds router inputs "
                        "(trace --moe-inputs-every); default twice the predictor's width, at most 1024; 0: none")
    p.add_argument("--lookahead-steps", type=positive_int, default=look.steps,
                   help=f"training steps of the lookahead heads (default {look.steps})")
    p.add_argument("--model", default=None,
                   help="the traced model, for the held-out loss with hash routing against exact mode "
                        "(default: the model the trace names, when it is a local directory)")
    p.add_argument("--no-hash-routing-eval", action="store_true", help="skip that held-out loss measurement")
    p.add_argument("--device", default=None, type=device_arg, help="default: cuda when available, else cpu")
    p.add_argument("--report", default=None, help="write the full report (JSON) here")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the initialisation and the batches (default {d.seed})")


#: train-predictor flags that override a preset's setting of the same TrainConfig field
_OVERRIDES = ("steps", "max_seconds", "batch_size", "lr", "kd_weight", "top_t", "target", "hidden", "head_hidden",
              "attn_blocks", "attn_heads", "bf16", "dropout")


def _stop_line(report: dict) -> str:
    """One line saying which limit ended training."""
    cfg = report["train_config"]
    if report["stopped_by"] == "max_seconds":
        return (f"training stopped by --max-seconds {cfg['max_seconds']:g} after {report['steps_run']} steps"
                + (f" (of the --steps {cfg['steps']} allowed)" if cfg["steps"] is not None else ""))
    line = f"training stopped at its step limit, {report['steps_run']} steps, after {report['train_seconds']:.1f} s"
    if cfg["max_seconds"] is not None:
        line += f" of the {cfg['max_seconds']:g} s --max-seconds allowed (raise --steps or leave it out to use them)"
    return line


def format_hash_routing(rep: dict) -> str:
    """``train.hash_routing_loss``'s result as two lines."""
    lines = [f"held-out loss, {rep['tokens']} tokens: exact mode {rep['exact']['loss']:.4f} "
             f"(perplexity {rep['exact']['perplexity']:.2f})"]
    for source, what in (("predicted", "predictor's experts and weights"), ("router", "predictor's experts, router's weights")):
        if source in rep:
            r = rep[source]
            lines.append(f"  hash routing ({what}): {r['loss']:.4f} (perplexity {r['perplexity']:.2f}, "
                         f"{100 * r['relative_increase']:+.2f}% loss)")
    return "\n".join(lines)


def run_train(args: argparse.Namespace) -> int:
    """Train the hash function on a trace, print the held-out report and save the predictor."""
    import torch

    from sida_moe.train.trace_loading import load_traces
    from sida_moe.train.evaluation import format_report
    from sida_moe.train.configs import TRAIN_PRESETS, TrainConfig
    from sida_moe.train.predictor_training import train_predictor

    blocks = args.attn_blocks if args.attn_blocks is not None else TRAIN_PRESETS[args.preset]["attn_blocks"]
    if blocks and args.hidden is not None and args.attn_heads is not None and args.hidden % args.attn_heads:
        raise UserError(f"--attn-heads {args.attn_heads} must divide --hidden {args.hidden} (the width of the attention blocks)")
    if args.bf16 and not (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        raise UserError("--bf16 needs a CUDA training device")
    with user_errors("--trace", args.trace):  # a wrong path or a trace of another model
        traces = load_traces(args.trace)
    with user_errors("--held-out", args.held_out):
        held = load_traces(args.held_out) if args.held_out else None
    out = args.out or traces.manifest.get("model_name_or_path")
    if not out or not (os.path.isdir(out) or args.out):
        raise UserError("--out is required: the trace does not name a local model directory to save next to")
    overrides = {name: getattr(args, name) for name in _OVERRIDES if getattr(args, name) is not None}
    try:
        config = TrainConfig.preset(
            args.preset, **overrides, seed=args.seed, fit_temperature=not args.no_fit_temperature,
            device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    width = config.widths(traces.manifest["hidden_size"])[0]
    if config.attn_blocks and width % config.attn_heads:
        raise UserError(f"--attn-heads {config.attn_heads} must divide the predictor width {width} (--hidden, or "
                        "scaled to the model)")
    lookahead_hidden = args.lookahead_hidden
    model = None
    model_path = args.model or traces.manifest.get("model_name_or_path")
    if held is not None and not args.no_hash_routing_eval and model_path and os.path.isdir(model_path):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path).to(config.device).eval()
    predictor, report = train_predictor(traces, config, held_out=held, model=model)
    print(f"loss {report['loss_first']:.4f} -> {report['loss_last_50']:.4f} in {report['train_seconds']:.1f} s; "
          f"{report['num_parameters']} parameters (width {predictor.config.hidden}, heads {predictor.config.head_hidden}, "
          f"{predictor.config.attn_blocks} attention blocks)")
    print(_stop_line(report))
    if held is not None:
        print(format_report(report["held_out"]))
    if "hash_routing" in report:
        print(format_hash_routing(report["hash_routing"]))
    elif held is not None and not args.no_hash_routing_eval:
        print("no hash-routing loss: the trace names no local model directory (pass --model)")
    if "temperature_fit" in report:
        temps = report["temperature_fit"]["weight_temperature"]
        print("hash routing weight temperature per MoE layer: " + " ".join(f"{t:g}" for t in temps))
    if lookahead_hidden is None:
        lookahead_hidden = min(1024, 2 * predictor.config.hidden)
    if lookahead_hidden and traces.moe_inputs is not None and traces.manifest["num_moe_layers"] > 1:
        from sida_moe.train.configs import LookaheadConfig
        from sida_moe.train.lookahead import train_lookahead

        look_held = held if held is not None and held.moe_inputs is not None else None
        report["lookahead"] = train_lookahead(
            predictor, traces, LookaheadConfig(hidden=lookahead_hidden, steps=args.lookahead_steps,
                                               seed=args.seed, device=config.device),
            held_out=look_held)
        k = traces.manifest["top_k"]
        if look_held is not None:
            rep = report["lookahead"]["held_out"]
            print(f"lookahead heads: recall@{k} {rep[f'mean_recall@{k}']:.4f} -> {rep[f'mean_lookahead_recall@{k}']:.4f} "
                  f"once the layer before has run ({rep['tokens']} held-out tokens); prompt tokens (no "
                  f"previous state) {rep[f'mean_prompt_lookahead_recall@{k}']:.4f}")
        else:
            print("lookahead heads trained (no held-out router inputs to evaluate them: trace the held-out "
                  "text with --moe-inputs-every 1)")
    elif lookahead_hidden and traces.moe_inputs is None:
        print("no lookahead heads: the trace holds no router inputs (trace with --moe-inputs-every N to train them)")
    predictor.save(out)
    print(f"saved to {out}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def register(register_command=None) -> None:
    """Add ``trace`` and ``train-predictor`` to the ``sida-moe`` command line."""
    if register_command is None:
        from sida_moe.cli import register_command
    register_command("trace", "record MoE routing traces of a model over a text corpus", _configure_trace, run_trace)
    register_command("train-predictor", "train the SiDA hash-function predictor on routing traces", _configure_train, run_train)


register()

__all__ = ["register", "run_trace", "run_train"]
