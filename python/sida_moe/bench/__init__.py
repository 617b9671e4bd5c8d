"""End-to-end serving benchmark (``sida-moe bench``): sida-moe in every policy / predictor /
budget configuration against all-resident (transformers' loop, and its decode step in a CUDA
graph), accelerate CPU offload, on-demand LRU and the SiDA paper's synchronous loading, on the
same prompts in one process."""

from sida_moe.bench.config import BenchConfig
from sida_moe.bench.runner import run_bench

__all__ = ["BenchConfig", "run_bench"]
