"""GPU expert budgets: parse ``0.25`` / ``"25%"`` / ``"12GiB"`` and turn them into a slot count."""

from __future__ import annotations

import math
import numbers
import re

_UNITS = {
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
_PATTERN = re.compile(r"^\s*([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*|%)\s*$")
_ALLOWED = "a fraction in (0, 1] of all experts (0.25), a percent ('25%'), or a size with a unit ('12GiB', '512MB', '4096B')"

BudgetSpec = str | float | int


def format_bytes(n: float) -> str:
    """Human-readable binary size, e.g. ``format_bytes(3 << 30) == '3.00 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _fraction_bytes(spec: BudgetSpec, value: float, total_bytes: int) -> int:
    """A unitless number: a share of all experts. Above 1 it would be ambiguous (was ``2`` two bytes
    or 200%?), so it is refused and the user adds a unit or a percent sign."""
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"gpu_budget {spec!r} is not a finite number; use {_ALLOWED}")
    if value <= 0:
        raise ValueError(f"gpu_budget {spec!r} must be positive; use {_ALLOWED}")
    if value > 1:
        text = str(spec).strip()
        raise ValueError(
            f"gpu_budget {spec!r} is a number above 1 without a unit: a bare number is a fraction in (0, 1] of "
            f"all experts; for a size add a unit ('{text}B', '{text}MiB'), for a share use a percent ('25%')"
        )
    return int(value * total_bytes)


def parse_budget(spec: BudgetSpec, total_bytes: int) -> int:
    """Bytes of GPU memory for experts, out of ``total_bytes`` (the size of all experts).

    One grammar for Python values and command-line strings:

    - a fraction in ``(0, 1]`` of all experts: ``0.25``, ``"0.25"``, ``1`` (all of them);
    - a percent in ``(0, 100]``: ``"25%"``;
    - a size with a unit: ``"12GiB"``, ``"512MB"``, ``"1.5G"``, ``"4096B"`` (KB/MB/GB/TB decimal,
      K/M/G/T and KiB/MiB/GiB/TiB binary, B bytes; case-insensitive).

    A bare number above 1 (``2``, ``"4096"``) is refused: add a unit (``"4096B"``) or a percent sign.
    A size above ``total_bytes`` is capped to it. Bad values raise ``ValueError`` (``TypeError`` for
    a value that is not a str or a number), naming the input and what is allowed.
    """
    if total_bytes <= 0:
        raise ValueError(f"total expert bytes must be positive, got {total_bytes}")
    if isinstance(spec, bool) or not isinstance(spec, (str, numbers.Real)):
        raise TypeError(f"gpu_budget must be a str or a number ({_ALLOWED}), got {type(spec).__name__}")
    if isinstance(spec, numbers.Real):
        return _fraction_bytes(spec, float(spec), total_bytes)
    match = _PATTERN.match(spec)
    unit = match.group(2).lower() if match else None
    if match is None or (unit and unit not in _UNITS and unit != "%"):
        raise ValueError(f"cannot parse gpu_budget {spec!r}; use {_ALLOWED}")
    value = float(match.group(1))
    if not unit:
        return _fraction_bytes(spec, value, total_bytes)
    if math.isinf(value):
        raise ValueError(f"gpu_budget {spec!r} is not a finite number; use {_ALLOWED}")
    if value <= 0:
        raise ValueError(f"gpu_budget {spec!r} must be positive; use {_ALLOWED}")
    if unit == "%":
        if value > 100:
            raise ValueError(f"a percentage gpu_budget must be at most 100%, got {spec!r}")
        return int(value / 100 * total_bytes)
    if value >= total_bytes / _UNITS[unit]:  # compared before multiplying: 1e300GiB would overflow
        return total_bytes
    return int(value * _UNITS[unit])


def check_budget(spec: BudgetSpec) -> None:
    """Raise what :func:`parse_budget` raises for ``spec``, before the size of the experts is known
    (the command line checks ``--gpu-budget`` while it parses its arguments)."""
    parse_budget(spec, 1)


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
            f"but one layer's top-k needs {min_slots}: the minimum budget is {need} bytes ('{need}B', {format_bytes(need)}, "
            f"{need / (total_experts * slot_nbytes):.2%} of all experts)"
        )
    return int(slots)


__all__ = ["BudgetSpec", "check_budget", "format_bytes", "parse_budget", "slots_for_budget"]
