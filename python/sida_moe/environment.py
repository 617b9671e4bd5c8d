"""The environment variables sida_moe reads, resolved and checked once per process
(:func:`environment`), so a wrong value fails at import with a message naming the allowed ones,
and no layer call reads ``os.environ``.

- ``SIDA_MOE_KERNELS=auto|reference``: ``reference`` forces the PyTorch reference path
  everywhere (debugging, and the "before" side of kernel benchmarks).
- ``SIDA_MOE_KERNEL_REGIME=gemv|mma|grouped_mm``: forces one CUDA kernel regime (benchmarks).
- ``SIDA_MOE_CACHE_DIR``: where compiled CUDA kernels are kept (default
  ``$XDG_CACHE_HOME/sida_moe/kernels``, or ``~/.cache/sida_moe/kernels``).

(``SIDA_MOE_TRACEBACK``, the command line's full traceback instead of one line, is read by the
command line when it reports an error.)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

KERNELS = ("auto", "reference")
KERNEL_REGIMES = ("gemv", "mma", "grouped_mm")


class EnvironmentSettingError(ValueError):
    """A ``SIDA_MOE_*`` variable holds a value it does not take (the message names the allowed ones)."""


@dataclass(frozen=True)
class Environment:
    kernels: Literal["auto", "reference"]
    kernel_regime: Literal["gemv", "mma", "grouped_mm"] | None  # None: chosen per shape
    kernel_cache_dir: Path

    @classmethod
    def read(cls, environ: Mapping[str, str]) -> Environment:
        """The settings ``environ`` holds (EnvironmentSettingError naming the variable and its
        allowed values)."""
        kernels = environ.get("SIDA_MOE_KERNELS", "auto")
        if kernels not in KERNELS:
            raise EnvironmentSettingError(f"SIDA_MOE_KERNELS must be 'auto' or 'reference', got {kernels!r}")
        regime = environ.get("SIDA_MOE_KERNEL_REGIME", "")
        if regime and regime not in KERNEL_REGIMES:
            raise EnvironmentSettingError(f"SIDA_MOE_KERNEL_REGIME must be one of {KERNEL_REGIMES}, got {regime!r}")
        cache = environ.get("SIDA_MOE_CACHE_DIR")
        if not cache:
            base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            cache = os.path.join(base, "sida_moe", "kernels")
        return cls(kernels, regime or None, Path(cache))


@functools.cache
def environment() -> Environment:
    """This process's settings, read from ``os.environ`` on first use."""
    return Environment.read(os.environ)


__all__ = ["Environment", "EnvironmentSettingError", "KERNELS", "KERNEL_REGIMES", "environment"]
