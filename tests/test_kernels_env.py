"""``SIDA_MOE_KERNELS`` selects the expert compute path; a wrong value is a clear error at import."""

import os
import subprocess
import sys

import torch

from sida_moe.format import ExpertFormat, slot_views


def _import_with(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SIDA_MOE_KERNELS=value)
    return subprocess.run([sys.executable, "-c", "import sida_moe.kernels"], env=env, capture_output=True, text=True)


def test_unknown_value_is_rejected_naming_the_allowed_ones():
    res = _import_with("fast")
    assert res.returncode != 0
    assert "SIDA_MOE_KERNELS must be 'auto' or 'reference', got 'fast'" in res.stderr


def test_reference_value_imports_and_computes():
    res = _import_with("reference")
    assert res.returncode == 0, res.stderr
    # and in this process (auto), the CPU path computes the definition
    from sida_moe.kernels import fused_experts

    fmt = ExpertFormat(hidden=8, intermediate=4, dtype=torch.float32)
    nbytes = sum(n for _, n in fmt.layout())
    buf = torch.randn(2, nbytes // 4).view(torch.uint8)
    offsets, off = {}, 0
    for name, n in fmt.layout():
        offsets[name] = off
        off += n
    w = slot_views(buf, fmt, offsets)
    x = torch.randn(3, 8)
    ids = torch.tensor([[0], [1], [0]])
    wt = torch.ones(3, 1)
    table = torch.tensor([1, 0], dtype=torch.int32)
    out = fused_experts(x, ids, wt, table, w, fmt)
    for t in range(3):
        s = int(table[ids[t, 0]])
        gu = w.gate_up[s] @ x[t]
        h = torch.nn.functional.silu(gu[:4]) * gu[4:]
        torch.testing.assert_close(out[t], w.down[s] @ h)


def test_the_environment_is_read_into_one_checked_object():
    from pathlib import Path

    import pytest

    from sida_moe.environment import Environment, environment

    env = Environment.read({})
    assert (env.kernels, env.kernel_regime) == ("auto", None)
    assert env.kernel_cache_dir == Path(os.path.expanduser("~")) / ".cache" / "sida_moe" / "kernels"
    assert Environment.read({"XDG_CACHE_HOME": "/x"}).kernel_cache_dir == Path("/x/sida_moe/kernels")
    assert Environment.read({"XDG_CACHE_HOME": "/x", "SIDA_MOE_CACHE_DIR": "/k"}).kernel_cache_dir == Path("/k")
    got = Environment.read({"SIDA_MOE_KERNELS": "reference", "SIDA_MOE_KERNEL_REGIME": "mma"})
    assert (got.kernels, got.kernel_regime) == ("reference", "mma")
    with pytest.raises(ValueError, match=r"SIDA_MOE_KERNEL_REGIME must be one of \('gemv', 'mma', 'grouped_mm'\), got 'fast'"):
        Environment.read({"SIDA_MOE_KERNEL_REGIME": "fast"})
    with pytest.raises(ValueError, match="SIDA_MOE_KERNELS must be 'auto' or 'reference'"):
        Environment.read({"SIDA_MOE_KERNELS": ""})
    assert environment() is environment()  # resolved once per process


def test_a_wrong_kernel_regime_fails_at_import():
    env = dict(os.environ, SIDA_MOE_KERNEL_REGIME="fast")
    res = subprocess.run([sys.executable, "-c", "import sida_moe.kernels"], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "SIDA_MOE_KERNEL_REGIME must be one of" in res.stderr
