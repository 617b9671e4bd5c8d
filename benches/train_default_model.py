"""Train the small MoE model shipped inside the package, and its SiDA predictor.

The no-argument ``sida-moe generate`` runs this model (``sida_moe.presets.BUNDLED_MODEL``), so it
must be small enough to ship (about 7 MB) and trained, so that its text is readable and its routing
has the locality and predictability of a real router (random weights route near uniformly).

Corpus: the Python standard library's sources (``sysconfig.get_paths()["stdlib"]``, PSF License),
site-packages and the test suites (``test``, ``tests``, ``idle_test``) excluded, split into train /
held-out files by a hash of their path (``train_reference_model.load_stdlib_split``; the same
files are held out on every machine that has them).

Model: transformers' Qwen3-MoE, 4 layers, hidden 128, 16 experts (intermediate 64) top-4,
load-balancing loss on, embeddings tied; a byte-level BPE tokenizer of 4096 tokens trained on the
train files. Saved with ``save_pretrained`` in bf16.

Predictor: routing traces of the saved model (``record_traces``, what ``sida-moe trace`` runs),
the hash-function network with ``TrainConfig``'s defaults (the best-measured variant, widths
scaled to the model: 128 wide, 64-wide heads, 2 attention blocks), lookahead heads (256 wide),
then evaluated on the held-out trace; stored in fp16 (half the bytes; evaluated after that
rounding). ``training.json`` records the corpus, every setting, the losses and the predictor's
held-out report, including the held-out loss with hash routing against exact mode.

    python benches/train_default_model.py --out python/sida_moe/models/qwen3-moe-stdlib   # one GPU: ~2.5 min
    # the same step counts on a CPU (hours; the GPU run's counts are in its training.json)
    python benches/train_default_model.py --out /tmp/m --device cpu --steps 2321 --predictor-steps 1991 --lookahead-steps 2863

Training runs for a wall-clock budget by default, so the step counts (and the weights) depend on
the machine; ``--steps`` / ``--predictor-steps`` / ``--lookahead-steps`` fix them instead. On a CPU
the model trains in float32, on a GPU under bf16 autocast (fp32 master weights).

Reuses ``train_reference_model.py`` (corpus, tokenizer, training loop) and the package's predictor
code; the native runtime is not needed (``predictor_common``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor_common import import_predictor_package  # noqa: E402

HAS_NATIVE = import_predictor_package()

from sida_moe.train.configs import LookaheadConfig, TrainConfig  # noqa: E402
from sida_moe.train.lookahead import evaluate_lookahead, train_lookahead  # noqa: E402
from sida_moe.predictor.model import HashPredictor  # noqa: E402
from sida_moe.train.traces import record_traces  # noqa: E402
from sida_moe.train.trace_loading import load_traces  # noqa: E402
from sida_moe.train.evaluation import evaluate  # noqa: E402
from sida_moe.train.predictor_training import hash_routing_loss, train_predictor  # noqa: E402

import train_reference_model as ref  # noqa: E402

#: directories of the standard library left out of the corpus besides site-packages: the test suites
#: (not installed everywhere: Debian ships them separately, so leaving them out keeps the corpus the
#: same across machines)
EXCLUDED_DIRS = ("test", "tests", "idle_test")


def build_model(vocab_size: int, eos_id: int, layers: int, hidden: int, experts: int, top_k: int, expert_size: int):
    """The reference model's recipe at this size: heads of 32, tied embeddings."""
    return ref.build_model(vocab_size, eos_id, layers=layers, experts=experts, top_k=top_k, hidden=hidden,
                           expert_size=expert_size, head_dim=32, dense_width=4 * hidden, tie_embeddings=True)


def mean_loss(model, ids: torch.Tensor, device: torch.device, batch: int = 32) -> float:
    """Mean next-token loss over ``ids [N, S]``."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            x = ids[i : i + batch].to(device)
            n = x.numel() - x.shape[0]
            total += float(model(input_ids=x, labels=x).loss) * n
            count += n
    return total / count


def find_psf_license() -> str | None:
    """The interpreter's copy of its license text (the PSF License Agreement), where it has one."""
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    for path in (os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt"),
                 os.path.join(sys.base_prefix, "LICENSE.txt"),
                 f"/usr/share/doc/python{ver}/copyright", f"/usr/share/doc/libpython{ver}-stdlib/copyright",
                 f"/usr/share/doc/python{ver}-minimal/copyright"):
        if os.path.isfile(path):
            return path
    return None


def write_notice(out: str, train_files: int, license_path: str | None) -> None:
    """NOTICE.md: where the training text came from and under which license."""
    where = (f"`LICENSE-PSF.txt` beside this file\n(copied from `{license_path}` of the training machine)"
             if license_path else "the LICENSE file of any Python distribution\n(https://docs.python.org/3/license.html)")
    text = f"""# Origin and license notes

The weights (`model.safetensors`, `predictor.safetensors`) and the tokenizer (`tokenizer.json`) in
this directory were trained by `benches/train_default_model.py` of sida-moe on the source files of
the Python {platform.python_version()} standard library
(`{ref.stdlib_corpus_dir()}`; site-packages and the test suites excluded; {train_files} training files).
That text is Copyright (c) Python Software Foundation and is distributed under the PSF License
Agreement (Python Software Foundation License Version 2); its text is {where}.
The model writes Python in the style of that code and may reproduce fragments of it.
Training settings, corpus and measurements: `training.json`.
"""
    with open(os.path.join(out, "NOTICE.md"), "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="checkpoint directory to write (model, tokenizer, predictor)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--seconds", type=float, default=110.0, help="model training wall-clock budget")
    ap.add_argument("--predictor-seconds", type=float, default=25.0, help="predictor network training budget")
    ap.add_argument("--lookahead-seconds", type=float, default=8.0, help="lookahead heads' training budget")
    ap.add_argument("--steps", type=int, default=None,
                    help="train the model exactly this many steps instead of for --seconds (the shipped one: 2321)")
    ap.add_argument("--predictor-steps", type=int, default=None,
                    help="predictor steps instead of --predictor-seconds (the shipped one: 1991)")
    ap.add_argument("--lookahead-steps", type=int, default=None,
                    help="lookahead heads' steps instead of --lookahead-seconds (the shipped ones: 2863)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--expert-size", type=int, default=64, help="each expert's intermediate width")
    ap.add_argument("--moe-inputs-every", type=int, default=4,
                    help="router inputs of every N-th training sequence are traced (the lookahead heads' data)")
    ap.add_argument("--eval-every", type=int, default=500, help="held-out loss every N model training steps")
    ap.add_argument("--max-files", type=int, default=None,
                    help="use at most this many train (and a tenth as many held-out) files: a quick smoke run")
    ap.add_argument("--work", default=None, help="directory for the traces (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.perf_counter()

    # ---- corpus and tokenizer
    train_docs, held_docs = ref.load_stdlib_split(exclude_dirs=EXCLUDED_DIRS)
    if args.max_files is not None:
        train_docs, held_docs = train_docs[: args.max_files], held_docs[: max(1, args.max_files // 10)]
    tokenizer = ref.train_tokenizer([text for _, text in train_docs], vocab_size=args.vocab_size)
    train_ids = ref.tokenize(tokenizer, train_docs, args.seq_len)
    held_ids = ref.tokenize(tokenizer, held_docs, args.seq_len)
    print(f"corpus {ref.stdlib_corpus_dir()} (Python {platform.python_version()}): {len(train_docs)} train files "
          f"({train_ids.numel()} tokens), {len(held_docs)} held-out files ({held_ids.numel()} tokens); "
          f"{time.perf_counter() - t_start:.0f} s", flush=True)

    # ---- the model
    torch.manual_seed(args.seed)
    model = build_model(len(tokenizer), tokenizer.eos_token_id, args.layers, args.hidden, args.experts, args.top_k,
                        args.expert_size)
    eval_ids = held_ids[: min(len(held_ids), 128)]

    def on_log(step: int) -> dict | None:
        if step == 0 or step % args.eval_every:
            return None
        loss = mean_loss(model, eval_ids, device)
        print(f"  held-out loss {loss:.3f} at step {step}", flush=True)
        return {"held_out_loss": loss}

    info = ref.train(model, train_ids, args.seconds, args.batch_size, lr=args.lr, seed=args.seed, device=str(device),
                     on_log=on_log, steps=args.steps)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)

    # ---- traces of the saved (bf16) model, as `sida-moe trace` records them
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.bfloat16).to(device).eval()
    info["held_out_loss_bf16"] = mean_loss(model, held_ids, device)
    print(f"model: {info['steps']} steps in {info['seconds']:.0f} s; held-out loss {info['held_out_loss_bf16']:.3f} "
          f"({held_ids.numel()} tokens, bf16 as saved)", flush=True)
    work = args.work or tempfile.mkdtemp(prefix="sida-default-model-")
    t0 = time.perf_counter()
    record_traces(model, train_ids, os.path.join(work, "trace-train"), batch_size=64, progress=False,
                  model_name_or_path=args.out, moe_inputs_every=args.moe_inputs_every)
    record_traces(model, held_ids, os.path.join(work, "trace-held"), batch_size=64, progress=False,
                  model_name_or_path=args.out, moe_inputs_every=1)
    trace_seconds = time.perf_counter() - t0
    tr = load_traces(os.path.join(work, "trace-train"), compact=True)
    ho = load_traces(os.path.join(work, "trace-held"))

    # ---- the predictor: TrainConfig's defaults (the best-measured variant, widths scaled to the model)
    cfg = TrainConfig(device=str(device), seed=args.seed, steps=args.predictor_steps,
                      max_seconds=None if args.predictor_steps else args.predictor_seconds)
    pred, rep = train_predictor(tr, cfg, held_out=ho, progress=False)
    look = LookaheadConfig(hidden=min(1024, 2 * pred.config.hidden), steps=args.lookahead_steps or 100_000,
                           batch_tokens=8192, max_seconds=None if args.lookahead_steps else args.lookahead_seconds,
                           device=str(device), seed=args.seed)
    look_rep = train_lookahead(pred, tr, look, held_out=ho, progress=False)
    # shipped in fp16: half the bytes; everything below measures the rounded weights
    copy.deepcopy(pred).half().save(args.out)
    shipped = HashPredictor.load(args.out, device=device)
    held_report = evaluate(shipped, ho, device=str(device))
    look_report = evaluate_lookahead(shipped, ho, device=str(device))
    hash_rep = hash_routing_loss(model, shipped, ho.input_ids[: min(128, ho.num_sequences)])
    k = ho.manifest["top_k"]
    print(f"predictor ({shipped.num_parameters()} parameters, {rep['steps_run']} steps, stopped by {rep['stopped_by']}): "
          f"held-out recall@{k} {held_report[f'mean_recall@{k}']:.4f}, fused with the next-layer gate "
          f"{held_report.get(f'mean_fused_recall@{k}', float('nan')):.4f}, lookahead heads "
          f"{look_report[f'mean_lookahead_recall@{k}']:.4f}", flush=True)
    print(f"hash routing, held-out loss: exact {hash_rep['exact']['loss']:.4f}, predicted weights "
          f"{hash_rep['predicted']['loss']:.4f} ({100 * hash_rep['predicted']['relative_increase']:+.2f}%), router "
          f"weights {hash_rep['router']['loss']:.4f} ({100 * hash_rep['router']['relative_increase']:+.2f}%)", flush=True)

    # ---- license notes: the weights and the tokenizer are derived from PSF-licensed text
    license_path = find_psf_license()
    if license_path is not None:
        shutil.copyfile(license_path, os.path.join(args.out, "LICENSE-PSF.txt"))
    write_notice(args.out, len(train_docs), license_path)
    rep.pop("loss_curve", None)
    look_rep.pop("loss_curve", None)
    summary = {
        "corpus": {"root": ref.stdlib_corpus_dir(), "python": platform.python_version(),
                   "excluded_dirs": ["site-packages", "dist-packages", *EXCLUDED_DIRS],
                   "train_files": len(train_docs), "held_out_files": sorted(p for p, _ in held_docs),
                   "train_tokens": int(train_ids.numel()), "held_out_tokens": int(held_ids.numel()),
                   "license": "PSF License Agreement (Python Software Foundation License Version 2)",
                   "license_text_copied_from": license_path},
        "args": vars(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": {"num_parameters": sum(p.numel() for p in model.parameters()), **info},
        "trace_seconds": trace_seconds,
        "predictor": {"train": {k2: v for k2, v in rep.items() if k2 != "held_out"}, "held_out": held_report,
                      "lookahead_train": {k2: v for k2, v in look_rep.items() if k2 != "held_out"},
                      "lookahead_held_out": look_report, "num_parameters": shipped.num_parameters(),
                      "stored_dtype": "float16"},
        "hash_routing": hash_rep,
        "total_seconds": time.perf_counter() - t_start,
    }
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"saved to {args.out} in {summary['total_seconds']:.0f} s", flush=True)
    return summary


if __name__ == "__main__":
    main()
