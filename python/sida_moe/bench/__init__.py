"""End-to-end serving benchmark (``sida-moe bench``): sida-moe in every policy / predictor /
budget configuration against all-resident (transformers' loop, and its decode step in a CUDA
graph), accelerate CPU offload, on-demand LRU and the SiDA paper's synchronous loading, on the
same prompts in one process."""

from typing import TYPE_CHECKING

from sida_moe._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"BenchConfig": "sida_moe.bench.config", "run_bench": "sida_moe.bench.runner"})

if TYPE_CHECKING:
    from sida_moe.bench.config import BenchConfig
    from sida_moe.bench.runner import run_bench

__all__ = ["BenchConfig", "run_bench"]
