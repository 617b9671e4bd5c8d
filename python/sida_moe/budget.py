"""GPU expert budgets: parse ``"12GiB"`` / ``0.25`` / ``int bytes`` and turn them into a slot count."""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*|%)\s*$")

BudgetSpec = str | float | int


def format_bytes(n: float) -> str:
    """Human-readable binary size, e.g. ``format_bytes(3 << 30) == '3.00 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_budget(spec: BudgetSpec, total_bytes: int) -> int:
    """Bytes of GPU memory for experts.

    ``spec`` is a size string (``"12GiB"``, ``"512MB"``, ``"1.5G"``: KB/MB/GB/TB are decimal, K/M/G/T and
    KiB/MiB/GiB/TiB binary), a percentage string (``"25%"``), a float fraction in ``(0, 1]`` of
    ``total_bytes`` (the size of all experts), or an int number of bytes. A budget above
    ``total_bytes`` is capped to it.
    """
    if total_bytes <= 0:
        raise ValueError(f"total expert bytes must be positive, got {total_bytes}")
    if isinstance(spec, bool):
        raise TypeError("gpu_budget must be a size string, a fraction or a byte count, not a bool")
    if isinstance(spec, int):
        if spec <= 0:
            raise ValueError(f"gpu_budget in bytes must be positive, got {spec}")
        nbytes = spec
    elif isinstance(spec, float):
        if not (0.0 < spec <= 1.0) or math.isnan(spec):
            raise ValueError(f"a fractional gpu_budget must be in (0, 1] (share of all experts), got {spec}")
        nbytes = int(spec * total_bytes)
    elif isinstance(spec, str):
        match = _PATTERN.match(spec)
        unit = match.group(2).lower() if match else None
        if match is None or (unit not in _UNITS and unit != "%"):
            raise ValueError(
                f"cannot parse gpu_budget {spec!r}; use e.g. '12GiB', '512MB', '1.5G', '25%', 0.25 or a byte count"
            )
        value = float(match.group(1))
        if value <= 0:
            raise ValueError(f"gpu_budget must be positive, got {spec!r}")
        if unit == "%":
            if value > 100:
                raise ValueError(f"a percentage gpu_budget must be at most 100%, got {spec!r}")
            nbytes = int(value / 100 * total_bytes)
        else:
            nbytes = int(value * _UNITS[unit])
    else:
        raise TypeError(f"gpu_budget must be a str, float or int, got {type(spec).__name__}")
    return min(nbytes, total_bytes)


def slots_for_budget(budget_bytes: int, slot_nbytes: int, total_experts: int, min_slots: int) -> int:
    """Number of cache slots fitting ``budget_bytes`` (at most one per expert).

    Raises ``sida_moe.BudgetError`` when fewer than ``min_slots`` fit (the experts one token needs in
    one layer); the message gives the minimum budget.
    """
    from sida_moe._native import BudgetError

    if slot_nbytes <= 0 or total_experts <= 0 or min_slots <= 0:
        raise ValueError(f"slot_nbytes, total_experts and min_slots must be positive, got {slot_nbytes}, {total_experts}, {min_slots}")
    slots = min(budget_bytes // slot_nbytes, total_experts)
    if slots < min_slots:
        need = min_slots * slot_nbytes
        raise BudgetError(
            f"gpu_budget of {format_bytes(budget_bytes)} holds {slots} expert slot(s) of {format_bytes(slot_nbytes)}, "
            f"but one layer's top-k needs {min_slots}: the minimum budget is {need} bytes ({format_bytes(need)}, "
            f"{need / (total_experts * slot_nbytes):.2%} of all experts)"
        )
    return int(slots)


__all__ = ["BudgetSpec", "format_bytes", "parse_budget", "slots_for_budget"]
