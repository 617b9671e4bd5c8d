"""Train a small, real MoE language model for predictor and cache measurements.

Random-weight MoE models route without the locality or predictability of trained routers, so the
predictor and cache numbers of this project come from this model, trained here on a corpus every
machine has offline: the Python standard library's sources (``sysconfig.get_paths()["stdlib"]``,
site-packages excluded). Files are split into train / held-out by a hash of their path, so
held-out numbers are on unseen files.

Model: transformers' Qwen3-MoE (8 layers, hidden 512, 32 experts of intermediate 512, top-4,
load-balancing loss on), byte-level BPE tokenizer of 8192 tokens trained on the train files.
On one H100 it trains in about three minutes. Output: ``save_pretrained`` model + tokenizer, and
``split.json`` naming the held-out files.

    python benches/train_reference_model.py --out /tmp/ref-moe --seconds 180

The 128-experts top-8 variant whose routing the 30B-shape benchmark replays
(``record_routing_trace.py``): experts of intermediate 192, so that the active experts' width over
the hidden size (8 x 192 / 512 = 3) is Qwen3-30B-A3B's (8 x 768 / 2048):

    python benches/train_reference_model.py --out /tmp/ref-moe-128x8 --experts 128 --top-k 8 --expert-size 192 --seconds 150

``--device cpu --steps N --max-files M`` is a smoke run (float32, a few files).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time

import torch

sys.path.append(os.path.join(os.path.dirname(__file__), "..", "python"))  # after an installed sida-moe


def stdlib_corpus_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def load_stdlib_split(held_out_fraction: float = 0.05, exclude_dirs: tuple[str, ...] = ()
                      ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) lists of (path, text) of the standard library's .py files; directories named
    in ``exclude_dirs`` (e.g. the test suites) are skipped besides site-packages."""
    from sida_moe.train.traces import split_held_out

    root = stdlib_corpus_dir()
    skip = {"site-packages", "dist-packages", "__pycache__", *exclude_dirs}
    docs = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    docs.append((os.path.relpath(path, root), f.read()))
    return split_held_out(docs, held_out_fraction)


def site_packages_dirs() -> list[str]:
    """This interpreter's installed-package directories (torch, transformers, numpy, ...): Python
    text that the reference model never trained on, for larger predictor traces."""
    import site

    dirs = [*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["purelib"]]
    return sorted({os.path.realpath(d) for d in dirs if os.path.isdir(d)})


def load_extra_corpus(roots: list[str], held_out: list[tuple[str, str]], max_chars: int) -> tuple[list[tuple[str, str]], dict]:
    """More ``.py`` files for predictor traces (not for the model): files under ``roots``, in an
    order fixed by a hash of their paths, up to ``max_chars`` characters. Held-out text must stay
    unseen, so a file is skipped when its name is a held-out file's name (stdlib copies and
    backports: ``tarfile.py`` vendored by setuptools) or when most of its long lines appear in the
    held-out files. Returns the documents and counts of what was skipped."""
    import zlib

    held_names = {os.path.basename(p) for p, _ in held_out} - {"__init__.py", "__main__.py"}
    held_lines = {line.strip() for _, text in held_out for line in text.splitlines() if len(line.strip()) >= 24}
    paths = []
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            paths.extend(os.path.join(dirpath, f) for f in files if f.endswith(".py"))
    paths.sort(key=lambda p: zlib.crc32(p.encode()))
    docs, chars, skipped = [], 0, {"same_name_as_held_out": 0, "copies_held_out_lines": 0, "empty": 0}
    for path in paths:
        if chars >= max_chars:
            break
        if os.path.basename(path) in held_names:
            skipped["same_name_as_held_out"] += 1
            continue
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        long_lines = [line.strip() for line in text.splitlines() if len(line.strip()) >= 24]
        if not long_lines:
            skipped["empty"] += 1
            continue
        if sum(line in held_lines for line in long_lines) > 0.5 * len(long_lines):
            skipped["copies_held_out_lines"] += 1
            continue
        docs.append((path, text))
        chars += len(text)
    return docs, {"roots": roots, "files": len(docs), "chars": chars, "candidates": len(paths), "skipped": skipped}


def train_tokenizer(texts: list[str], vocab_size: int = 8192):
    """Byte-level BPE (GPT-2 style pre-tokenisation) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tokenize(tokenizer, docs: list[tuple[str, str]], seq_len: int) -> torch.Tensor:
    from sida_moe.train.traces import chunk_token_ids

    ids = tokenizer([text for _, text in docs], add_special_tokens=False)["input_ids"]
    return chunk_token_ids(ids, seq_len, separator=tokenizer.eos_token_id)


def build_model(vocab_size: int, eos_id: int, layers: int = 8, experts: int = 32, top_k: int = 4,
                hidden: int = 512, expert_size: int = 512, head_dim: int = 64, dense_width: int | None = None,
                tie_embeddings: bool = False):
    """Heads of ``head_dim`` (``hidden // head_dim`` of them, half as many key-value heads);
    ``dense_width``: the config's dense MLP width (default 2 x hidden; unused, every layer is MoE)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    if hidden % head_dim:
        raise ValueError(f"hidden must be a multiple of the head size {head_dim}, got {hidden}")
    heads = hidden // head_dim
    config = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=dense_width or 2 * hidden,
        moe_intermediate_size=expert_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=head_dim,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        max_position_embeddings=1024,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return Qwen3MoeForCausalLM(config)


def _autocast(device: torch.device):
    """bf16 autocast on a GPU; the CPU trains in float32 (its bf16 matmuls are slower)."""
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _pick_experts_impl(model, batch: torch.Tensor) -> str:
    """grouped_mm when it runs forward+backward here (fp32 master weights under bf16 autocast),
    else the eager per-expert loop."""
    for impl in ("grouped_mm", "eager"):
        try:
            model.set_experts_implementation(impl)
            with _autocast(batch.device):
                out = model(input_ids=batch[:2], labels=batch[:2])
            out.loss.backward()
            model.zero_grad(set_to_none=True)
            return impl
        except Exception as exc:  # noqa: BLE001 -- any failure means: use the next implementation
            print(f"experts implementation {impl!r} unusable here: {type(exc).__name__}: {exc}"[:300])
    raise RuntimeError("no experts implementation trains on this machine")


def train(model, train_ids: torch.Tensor, seconds: float, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
          device: str = "cuda", on_log=None, steps: int | None = None) -> dict:
    """AdamW with warmup + cosine decay over a wall-clock budget (step count estimated after 20 steps),
    or over exactly ``steps`` steps when given (a run repeated on another machine).
    ``on_log(step)``, when given, runs at every logged step (every 50) and may return a dict that is
    recorded in the result's ``evals``."""
    device = torch.device(device)
    model.to(device).train()
    torch.manual_seed(seed)
    impl = _pick_experts_impl(model, train_ids[:2].to(device))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    warmup, total, step, t0, losses, evals = 50, steps, 0, time.perf_counter(), [], []
    while True:
        elapsed = time.perf_counter() - t0
        if step == 20 and steps is None:
            total = max(100, int(seconds / (elapsed / 20)))
        if total is not None and step >= total:
            break
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, (total or 10**9) - warmup))))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        rows = torch.randint(0, train_ids.shape[0], (batch_size,), generator=gen)
        batch = train_ids[rows].to(device, non_blocking=True)
        with _autocast(device):
            out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            losses.append((step, float(out.loss.detach())))
            print(f"step {step} loss {losses[-1][1]:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
            extra = on_log(step) if on_log is not None else None
            if extra:
                evals.append({"step": step, **extra})
                model.train()
        step += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"steps": step, "seconds": time.perf_counter() - t0, "experts_implementation": impl, "loss_curve": losses,
            "tokens_seen": step * batch_size * train_ids.shape[1], **({"evals": evals} if evals else {})}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for save_pretrained")
    ap.add_argument("--seconds", type=float, default=180.0, help="training wall-clock budget")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512, help="hidden size (a multiple of 64: heads of 64)")
    ap.add_argument("--expert-size", type=int, default=512, help="each expert's intermediate width")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (float32)")
    ap.add_argument("--steps", type=int, default=None, help="train exactly this many steps instead of --seconds")
    ap.add_argument("--max-files", type=int, default=None,
                    help="use at most this many train (and a tenth as many held-out) files: a smoke run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train_reference_model.py needs a CUDA GPU (it trains in minutes on one H100); "
                         "--device cpu is a smoke run")

    t0 = time.perf_counter()
    train_docs, held_docs = load_stdlib_split()
    if args.max_files is not None:
        train_docs, held_docs = train_docs[: args.max_files], held_docs[: max(1, args.max_files // 10)]
    tokenizer = train_tokenizer([text for _, text in train_docs], vocab_size=args.vocab_size)
    train_ids = tokenize(tokenizer, train_docs, args.seq_len)
    held_ids = tokenize(tokenizer, held_docs, args.seq_len)
    prep_seconds = time.perf_counter() - t0
    print(f"corpus: {len(train_docs)} train files ({train_ids.numel()} tokens), {len(held_docs)} held-out files "
          f"({held_ids.numel()} tokens); tokenizer in {prep_seconds:.0f}s", flush=True)

    torch.manual_seed(args.seed)
    model = build_model(len(tokenizer), tokenizer.eos_token_id, args.layers, args.experts, args.top_k,
                        args.hidden, args.expert_size)
    info = train(model, train_ids, args.seconds, args.batch_size, seed=args.seed, device=str(device), steps=args.steps)

    model.eval()
    with torch.no_grad(), _autocast(device):
        held_losses = [float(model(input_ids=held_ids[i : i + 16].to(device), labels=held_ids[i : i + 16].to(device)).loss)
                       for i in range(0, min(len(held_ids), 256), 16)]
    info["held_out_loss"] = sum(held_losses) / len(held_losses)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    summary = {
        "corpus": stdlib_corpus_dir(),
        "train_files": len(train_docs),
        "held_out_files": [p for p, _ in held_docs],
        "train_tokens": int(train_ids.numel()),
        "held_out_tokens": int(held_ids.numel()),
        "seq_len": args.seq_len,
        "model": {"layers": args.layers, "experts": args.experts, "top_k": args.top_k, "hidden": args.hidden,
                  "expert_size": args.expert_size, "vocab_size": len(tokenizer)},
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "prep_seconds": prep_seconds,
        **info,
    }
    with open(os.path.join(args.out, "split.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"saved to {args.out}: held-out loss {info['held_out_loss']:.3f} after {info['steps']} steps", flush=True)
    return summary


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from predictor_common import import_predictor_package

    import_predictor_package()  # the split needs sida_moe.predictor only: runs without the native runtime too
    main()
