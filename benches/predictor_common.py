"""Helpers shared by the predictor benches: the package import, the prediction-horizon shares, and
the report they print and save.

The predictor package is pure Python/PyTorch. When the native runtime is not installed (a GPU
machine given only the source tree), ``import sida_moe`` fails on ``sida_moe._native``; the
predictor benches then load ``sida_moe`` as a bare namespace over ``python/sida_moe`` so that
``sida_moe.predictor`` imports without the runtime. With the wheel installed, nothing changes.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import types

PYTHON_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "python"))


def import_predictor_package() -> bool:
    """Make ``sida_moe.predictor`` importable; returns True when the native runtime is present."""
    try:  # the installed wheel (with the native runtime) first
        importlib.import_module("sida_moe")
        return True
    except ImportError:
        for name in [m for m in sys.modules if m == "sida_moe" or m.startswith("sida_moe.")]:
            del sys.modules[name]
    if PYTHON_DIR not in sys.path:
        sys.path.insert(0, PYTHON_DIR)
    try:
        importlib.import_module("sida_moe")
        return True
    except ImportError as exc:
        if "_native" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "sida_moe" or m.startswith("sida_moe.")]:
        del sys.modules[name]
    pkg = types.ModuleType("sida_moe")
    pkg.__path__ = [os.path.join(PYTHON_DIR, "sida_moe")]
    sys.modules["sida_moe"] = pkg
    return False


def emit_report(report: dict, out: str | None) -> None:
    """Print ``report`` as JSON and, with ``out``, write it there too."""
    print(json.dumps(report, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)


def horizon_shares(routed, predicted, num_experts: int) -> dict:
    """How a decode prediction compares with the last step's routing once its copies land.
    ``routed`` / ``predicted`` ``[..., S, k]``: each token's routed and predicted experts (the
    prediction at input position j, made when token j is known). Over steps t+2 of every sequence,
    the shares of the routed experts that step t+1 routed (``last_step``), that the prediction made
    from token t+1 names (``named``), that it names and step t+1 did not route
    (``beyond_last_step``: what it adds when its copies land for t+2), and that the prediction made
    from token t+2 itself names beyond step t+1 (``own_beyond_last_step``: an upper bound for a
    predictor looking one token further)."""
    import torch

    def hot(ids):
        return torch.zeros(*ids.shape[:-1], num_experts, dtype=torch.bool).scatter_(-1, ids.long(), True)

    want, last = hot(routed[..., 2:, :]), hot(routed[..., 1:-1, :])
    ahead, own = hot(predicted[..., 1:-1, :]), hot(predicted[..., 2:, :])
    total = want.sum().item()
    return {"last_step": (want & last).sum().item() / total, "named": (want & ahead).sum().item() / total,
            "beyond_last_step": (want & ahead & ~last).sum().item() / total,
            "own_beyond_last_step": (want & own & ~last).sum().item() / total}
