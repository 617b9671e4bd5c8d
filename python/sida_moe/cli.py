"""``sida-moe`` command line. Subcommands register themselves with :func:`register_command`;
``generate`` lives here, others (``trace``, ``train-predictor``, ``bench``) come from the modules
listed in ``COMMAND_MODULES`` or from the ``sida_moe.commands`` entry-point group.

A user's mistake (a bad argument, a missing file, a checkpoint that cannot be read) raises
:class:`UserError`; ``main`` prints it as one line on stderr and returns 2. Ctrl-C returns 130.
``SIDA_MOE_TRACEBACK=1`` re-raises instead, for debugging.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sida_moe.environment import EnvironmentSettingError

#: modules imported by ``main`` so that their ``register_command`` calls run; missing ones are skipped
COMMAND_MODULES: list[str] = ["sida_moe.train.cli", "sida_moe.bench.cli"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


_COMMANDS: dict[str, Command] = {}


class UserError(Exception):
    """A mistake in the command line or in the files it names: ``main`` prints the message as one
    line on stderr and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse's errors (usage lines, then exit 2) become one-line :class:`UserError`."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


@contextlib.contextmanager
def user_errors(what: str, path: str | os.PathLike | None = None) -> Iterator[None]:
    """Inside the block, what reading a user's files raises when the files (not the program) are
    wrong becomes a :class:`UserError` "``what`` ``path``: message" (``path`` left out when the
    message names it already). A ``BudgetError`` passes unchanged."""
    from safetensors import SafetensorError

    from sida_moe._native import BudgetError

    try:
        yield
    except (BudgetError, UserError):
        raise
    except (OSError, ValueError, KeyError, NotImplementedError, SafetensorError) as e:
        detail = str(e) or type(e).__name__
        where = f"{what} {os.fspath(path)}" if path is not None and os.fspath(path) not in detail else what
        raise UserError(f"{where}: {detail}") from e


# ------------------------------------------------------------------------------ argument types
# argparse turns an ArgumentTypeError into "argument --flag: <message>" (one line, through _Parser)
def budget_arg(text: str) -> str:
    """``--gpu-budget``: checked against :func:`sida_moe.budget.parse_budget`'s grammar, kept as text."""
    from sida_moe.budget import check_budget

    try:
        check_budget(text)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def device_arg(text: str) -> str:
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N`` of a GPU this machine has."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use 'cpu', 'cuda' or 'cuda:N'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available on this machine; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return str(device)


def _number(text: str, kind: type, ok: Callable[[float], bool], what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v > 0, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a positive number")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: v >= 0, "a number >= 0")


def open_fraction(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < 1, "a number in (0, 1)")


def register_command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], int]) -> None:
    """Add a subcommand: ``configure`` adds its arguments, ``run`` executes it and returns the exit code."""
    if name in _COMMANDS and _COMMANDS[name].run is not run:
        raise ValueError(f"sida-moe subcommand {name!r} is already registered")
    _COMMANDS[name] = Command(name, help, configure, run)


# ------------------------------------------------------------------------------------ generate
def _configure_generate(p: argparse.ArgumentParser) -> None:
    from sida_moe.presets import BUNDLED_MODELS, DEFAULT_MODEL, PRESETS

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory, a bundled trained model ({', '.join(BUNDLED_MODELS)}) or a "
                        f"random-weight preset ({', '.join(PRESETS)}); default {DEFAULT_MODEL}")
    p.add_argument("--gpu-budget", default="25%", type=budget_arg,
                   help="GPU memory for experts: a fraction 0.25, a percent '25%%' or a size '12GiB' / '512MB' (default 25%%)")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch); default one short prompt")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--policy", default="auto", choices=["auto", "lru", "lfu", "fifo", "predictive"],
                   help="slot eviction; 'auto' (default): predictive with the SiDA predictor (it feeds the policy "
                        "each token's predicted experts), else lru")
    p.add_argument("--prefetch", default="auto", choices=["auto", "next_layer_gate", "none", "sida"],
                   help="'sida': the trained SiDA predictor saved in the checkpoint directory (sida-moe train-predictor); "
                        "'auto' (default): sida when the checkpoint has one (the bundled model does), else next_layer_gate")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on a GPU, float32 on the CPU (checkpoints: their own dtype)")
    p.add_argument("--device", default=None, type=device_arg, help="'cuda', 'cuda:1' or 'cpu' (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights")


class _TokenClock:
    """A generate() streamer recording when each step's tokens arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        return None


def _run_generate(args: argparse.Namespace) -> int:
    import os

    import torch

    from sida_moe.budget import format_bytes
    from sida_moe.presets import BUNDLED_MODELS, PRESETS, bundled_model_path
    from sida_moe.preset_models import build_offloaded
    from sida_moe.byte_tokenizer import ByteTokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    budget = args.gpu_budget
    bundled = args.model in BUNDLED_MODELS
    if bundled:
        args.model = bundled_model_path(args.model)
    elif args.model not in PRESETS and not os.path.isdir(args.model):
        raise UserError(f"--model {args.model!r} is neither a directory, a bundled model ({', '.join(BUNDLED_MODELS)}) "
                        f"nor a preset ({', '.join(PRESETS)})")
    _check_context(args.model, args.max_new_tokens)
    # the bundled model knows Python source only (its training text)
    default_prompt = 'def read_config(path):\n    """' if bundled else "The SiDA-MoE runtime keeps experts in pinned memory and"
    prompts = args.prompt or [default_prompt]
    if args.prefetch == "auto":
        from sida_moe.predictor.model import has_predictor

        args.prefetch = "sida" if args.model not in PRESETS and os.path.isdir(args.model) and has_predictor(args.model) \
            else "next_layer_gate"
    if args.prefetch == "sida":
        from sida_moe.predictor.model import has_predictor

        if args.model in PRESETS or not has_predictor(args.model):
            raise UserError(f"--prefetch sida needs a checkpoint directory holding a trained predictor "
                             f"(predictor.json + predictor.safetensors from sida-moe train-predictor); {args.model!r} has none")
        from sida_moe.predictor import load_prefetcher

        with user_errors(f"cannot load the predictor in {args.model}"):
            args.prefetch = load_prefetcher(args.model)
    if args.policy == "auto":
        args.policy = "lru" if isinstance(args.prefetch, str) else "predictive"
    if args.model in PRESETS:
        dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        t0 = time.perf_counter()
        model = build_offloaded(args.model, budget, device, dtype, args.policy, args.prefetch, seed=args.seed, progress=True)
        tokenizer = ByteTokenizer()
        source = f"preset {args.model} (random weights)"
    elif os.path.isdir(args.model):
        from sida_moe.offloading import from_pretrained

        t0 = time.perf_counter()
        with user_errors(f"cannot load the checkpoint {args.model}"):
            model = from_pretrained(args.model, budget, args.dtype, device, args.policy, args.prefetch)
        tokenizer = _checkpoint_tokenizer(args.model)
        vocab = model.get_input_embeddings().num_embeddings
        if isinstance(tokenizer, ByteTokenizer) and vocab < 256 + ByteTokenizer.offset:
            model.sida_engine.close()
            raise UserError(f"{args.model} ships no tokenizer and its vocabulary of {vocab} tokens is too small for "
                             f"the built-in byte tokenizer (needs {256 + ByteTokenizer.offset})")
        source = f"checkpoint {args.model}"
    build_s = time.perf_counter() - t0
    engine = model.sida_engine
    print(f"{source}: built in {build_s:.1f} s; {engine.describe()}")

    batch = tokenizer(prompts)
    batch = {k: v.to(device) for k, v in batch.items()}
    try:
        _check_context(args.model, args.max_new_tokens, batch["input_ids"].shape[1], model.config)
    except UserError:
        engine.close()
        raise
    gen = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id)
    if getattr(model.config, "is_encoder_decoder", False):
        gen["decoder_start_token_id"] = model.config.decoder_start_token_id
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=2, **gen)  # warm-up: kernels, allocator, caches
        engine.reset_stats()
        clock = _TokenClock()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=args.max_new_tokens, streamer=clock, **gen)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total_s = time.perf_counter() - start
    prompt_len = 0 if getattr(model.config, "is_encoder_decoder", False) else batch["input_ids"].shape[1]
    for row, prompt in zip(out, prompts):
        ids = row[prompt_len:].tolist()
        print(f"--- {prompt!r} -> token ids {ids[:16]}{' ...' if len(ids) > 16 else ''}:\n{prompt}{tokenizer.decode(ids)}\n---")
    new_tokens = out.shape[1] - prompt_len - (1 if getattr(model.config, "is_encoder_decoder", False) else 0)
    steps = clock.times[1:]  # the first put() is the prompt
    decode_s = steps[-1] - steps[0] if len(steps) > 1 else total_s
    decode_tps = (len(steps) - 1) * len(prompts) / decode_s if len(steps) > 1 and decode_s > 0 else float("nan")
    stats = engine.stats()
    generated = max(new_tokens, 1) * len(prompts)
    print(f"tokens/s: {generated / total_s:.2f} end-to-end ({generated} tokens in {total_s:.2f} s), decode {decode_tps:.2f}")
    predicted = {"sida": "SiDA predictor recall", "next_layer_gate": "next-layer-gate prediction recall"}.get(
        str(stats.get("prefetcher")), "prediction recall")
    print(f"expert hit rate: {stats['hit_rate']:.3f} ({int(stats['hits'])} hits, {int(stats['misses'])} misses)"
          + (f"; {predicted} {stats['prefetch_hit_rate']:.3f} (used experts that were predicted)"
             if "prefetch_hit_rate" in stats else ""))
    print(f"bytes moved per token: {format_bytes(stats['bytes_copied'] / generated)} "
          f"({format_bytes(stats['bytes_copied'])} total, {stats.get('achieved_gbps', 0.0):.1f} GB/s)")
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"expert memory on {engine.device}: {format_bytes(stats['slot_bytes'])} of slots vs {format_bytes(stats['all_experts_bytes'])} "
          f"all-resident; dense weights {format_bytes(dense)}; total {format_bytes(stats['slot_bytes'] + dense)} vs "
          f"{format_bytes(stats['all_experts_bytes'] + dense)}")
    if device.type == "cuda":
        print(f"peak GPU memory allocated while generating: {format_bytes(torch.cuda.max_memory_allocated(device))}")
    engine.close()
    return 0


def _check_context(model: str, new_tokens: int, prompt_tokens: int = 0, config=None) -> None:
    """Refuse ``--max-new-tokens`` beyond the model's context (``max_position_embeddings``; a
    decoder-only model's prompt counts too). Without ``config`` it is read from the preset or the
    checkpoint's config.json, before anything is built."""
    if config is None:
        from sida_moe.presets import PRESETS, preset_config

        if model in PRESETS:
            config = preset_config(model)
        else:
            from transformers import AutoConfig

            with user_errors(f"cannot read the checkpoint {model}"):
                config = AutoConfig.from_pretrained(model, local_files_only=True)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return  # no learned position limit (e.g. relative attention)
    if getattr(config, "is_encoder_decoder", False):
        prompt_tokens = 1  # the decoder starts from one start token
    if prompt_tokens + new_tokens > limit:
        prompt = f" after a prompt of {prompt_tokens} tokens" if prompt_tokens else ""
        raise UserError(f"--max-new-tokens {new_tokens} exceeds the model's context of {limit} tokens "
                        f"(max_position_embeddings){prompt}: at most {max(limit - prompt_tokens, 0)}")


def _checkpoint_tokenizer(path: str):
    """The checkpoint's own tokenizer when it ships one (local files only), else bytes."""
    from pathlib import Path

    from sida_moe.byte_tokenizer import ByteTokenizer

    if not any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return ByteTokenizer()
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side="left")
    except (OSError, ValueError, KeyError):
        return ByteTokenizer()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token

    class _Wrapped:
        pad_token_id = tok.pad_token_id

        def __call__(self, texts):
            return dict(tok(texts, return_tensors="pt", padding=True))

        def decode(self, ids):
            return tok.decode(ids, skip_special_tokens=True)

    return _Wrapped()


register_command("generate", "generate text with an offloaded MoE model (default: a built-in preset)",
                 _configure_generate, _run_generate)


# ---------------------------------------------------------------------------------------- main
def _load_command_modules() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):
                raise
            continue
        register = getattr(module, "register", None)
        if callable(register):
            register()
    from importlib.metadata import entry_points

    for ep in entry_points(group="sida_moe.commands"):
        ep.load()


def build_parser() -> argparse.ArgumentParser:
    from sida_moe import __version__

    _load_command_modules()
    parser = _Parser(prog="sida-moe", description="Serve MoE models whose experts do not fit in GPU memory.")
    parser.add_argument("--version", action="version", version=f"sida-moe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _COMMANDS.values():
        command.configure(sub.add_parser(command.name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sida-moe`` script; returns the exit code. With no subcommand it runs
    ``generate`` with its defaults. A :class:`UserError` (or a ``BudgetError``) is printed as one
    line on stderr and gives 2; Ctrl-C gives 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "sida-moe"
    try:
        parser = build_parser()
        if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
            argv = ["generate", *argv]
        if argv[0] in _COMMANDS:
            prog = f"sida-moe {argv[0]}"
        args = parser.parse_args(argv)
        if args.command is None:
            raise UserError("no command given (see sida-moe --help)")
        return _COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        if os.environ.get("SIDA_MOE_TRACEBACK"):
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        native = sys.modules.get("sida_moe._native")  # imported by then if a BudgetError could arise
        if not (isinstance(e, (UserError, EnvironmentSettingError))
                or native is not None and isinstance(e, native.BudgetError)):
            raise
        if os.environ.get("SIDA_MOE_TRACEBACK"):
            raise
        message = " ".join(str(e).split())  # one line, whatever the message held
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
