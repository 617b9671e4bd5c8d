"""What a ``sida-moe bench`` run measures (``BenchConfig``), checked before anything is loaded, and
which optional parts of it this installation can run."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

POLICIES = ("lru", "lfu", "fifo", "predictive", "belady")
PREDICTORS = ("none", "next_layer_gate", "sida")
BASELINES = ("resident", "resident_graphed", "accelerate_cpu", "ondemand_lru", "sida_sync")
#: how to get the optional parts: the ``bench`` extra declares accelerate and matplotlib
INSTALL_HINT = 'python3 -m pip install ".[bench]" in the sida-moe checkout'


class BenchInputError(ValueError):
    """A bad benchmark input (configuration, model, prompt file, predictor); raised before the
    first row runs."""


@dataclass
class BenchConfig:
    """What to run. ``model`` is a preset name or a checkpoint directory."""

    model: str = "qwen3-moe-tiny"
    device: str | None = None
    dtype: str | None = None
    budgets: tuple[float, ...] = (0.1, 0.25, 0.5)
    policies: tuple[str, ...] = ("lru", "predictive", "belady")
    predictors: tuple[str, ...] = ("none", "next_layer_gate")
    predictor_path: str | None = None
    prompt_file: str | None = None  # real text for the prompts (trained models); default random ids
    # a trained model's recorded routing (.npz, sida_moe.bench.replay) replayed by every system
    # instead of the routers' choices: random-weight presets then see a trained router's locality
    routing_trace: str | None = None
    batch_sizes: tuple[int, ...] = (1,)
    prompt_tokens: int = 32
    new_tokens: int = 32
    rounds: int = 3  # interleaved timing rounds per system (accelerate_cpu: one)
    baselines: tuple[str, ...] = BASELINES
    accelerate_new_tokens: int = 4
    seed: int = 0
    timeline: bool = True
    # Random-weight presets decode greedily into one repeated token, whose routing never changes
    # (a cache's best case). Sampling (seeded, identical for every system) gives varied tokens.
    sample: bool | None = None  # None: sample for presets, greedy for checkpoints
    # the graphed decode steps (sida-moe's rows, resident_graphed) compiled with torch.compile first
    compile: bool = False
    out_dir: str | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise :class:`BenchInputError` (a ValueError) for a bad name, number or path."""
        bad = [p for p in self.policies if p not in POLICIES]
        if bad:
            raise BenchInputError(f"unknown policies {bad}; choose from {POLICIES}")
        bad = [p for p in self.predictors if p not in PREDICTORS and sida_k(p) is None]
        if bad:
            raise BenchInputError(f"unknown predictors {bad}; choose from {PREDICTORS}, or sida@K (K experts per layer)")
        if any(p.startswith("sida") for p in self.predictors) and not self.predictor_path:
            raise BenchInputError("the 'sida' predictor needs predictor_path (a trained predictor directory)")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise BenchInputError(f"unknown baselines {bad}; choose from {BASELINES}")
        if not self.budgets or any(not (0 < b <= 1) for b in self.budgets):
            raise BenchInputError(f"budgets must be fractions in (0, 1], got {self.budgets}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes) or self.prompt_tokens < 1 or self.new_tokens < 2:
            raise BenchInputError("batch sizes and prompt_tokens must be >= 1 and new_tokens >= 2")
        if self.rounds < 1:
            raise BenchInputError(f"rounds must be >= 1, got {self.rounds}")
        if self.compile and bench_device(self).type != "cuda":
            raise BenchInputError("compile: the compiled decode step is replayed from a CUDA graph; it needs a CUDA "
                                  f"device, not {bench_device(self)}")
        if self.routing_trace is not None:
            from sida_moe.bench.replay import RoutingTraceError, load_routing_trace

            try:
                load_routing_trace(self.routing_trace)
            except RoutingTraceError as e:
                raise BenchInputError(str(e)) from None
        if self.prompt_file is not None and not Path(self.prompt_file).is_file():
            raise BenchInputError(f"prompt file {self.prompt_file!r} is not a file")
        if self.predictor_path is not None and any(p.startswith("sida") for p in self.predictors):
            from sida_moe.predictor.model import has_predictor

            if not has_predictor(self.predictor_path):
                raise BenchInputError(f"predictor path {self.predictor_path!r} holds no trained predictor "
                                      "(predictor.json + predictor.safetensors from sida-moe train-predictor)")


def bench_device(cfg: BenchConfig) -> torch.device:
    import torch  # here, not at the top: the command line reads this module's names without torch

    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def optional_parts(cfg: BenchConfig) -> tuple[tuple[str, ...], bool, str | None]:
    """What of ``cfg`` this installation and device can run: the baselines, whether to plot, and a
    one-line note naming what is skipped and why (None when nothing is)."""
    def importable(name: str) -> bool:
        try:
            importlib.import_module(name)
        except ImportError:
            return False
        return True

    baselines, plots, missing, skipped = cfg.baselines, bool(cfg.out_dir), [], []
    if "accelerate_cpu" in baselines and not importable("accelerate"):
        baselines = tuple(b for b in baselines if b != "accelerate_cpu")
        missing.append("accelerate")
        skipped.append("the accelerate_cpu baseline")
    if plots and not importable("matplotlib"):
        plots = False
        missing.append("matplotlib")
        skipped.append("the plots (bench.json and bench.md are still written)")
    notes = []
    if missing:
        notes.append(f"skipping {' and '.join(skipped)}: {' and '.join(missing)} "
                     f"{'is' if len(missing) == 1 else 'are'} not installed ({INSTALL_HINT})")
    if "resident_graphed" in baselines:
        if bench_device(cfg).type != "cuda":
            baselines = tuple(b for b in baselines if b != "resident_graphed")
            notes.append("skipping the resident_graphed baseline: CUDA graphs need a CUDA device")
    return baselines, plots, "; ".join(notes) or None


# ----------------------------------------------------------------------------- building blocks


def sida_k(name: str) -> int | None:
    """K of a ``sida@K`` predictor name (prefetch K predicted experts per token and layer), else None."""
    head, sep, tail = name.partition("@")
    if head != "sida" or not sep or not tail.isdigit() or int(tail) < 1:
        return None
    return int(tail)
