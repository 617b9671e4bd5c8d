"""Shared setup of the native-runtime microbenchmarks (pytest-benchmark).

Run: ``python -m pytest benches/bench_native_*.py --benchmark-json=out.json`` (these files,
or the whole folder: ``pytest benches/ --benchmark-json=out.json``). On a machine with
CUDA the runtime's CUDA backend is measured against torch; elsewhere the host backend (memcpy).
Throughputs and slowdowns are put in each benchmark's ``extra_info``.
"""

from __future__ import annotations

import pytest
import torch

import sida_moe as sm


def cuda() -> bool:
    return torch.cuda.is_available() and sm.Backend.cuda_available()


@pytest.fixture(scope="session")
def native_backend() -> sm.Backend:
    return sm.Backend("cuda" if cuda() else "host")


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["sida_moe"] = sm.__version__
    machine_info["native_backend"] = "cuda" if cuda() else "host"
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name(0)

