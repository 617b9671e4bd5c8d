"""GPU budget parsing and slot counts."""

import pytest

import sida_moe
from sida_moe.budget import format_bytes, parse_budget, slots_for_budget

TOTAL = 100 * 2**30


@pytest.mark.parametrize("spec, expected", [
    ("12GiB", 12 * 2**30), ("12G", 12 * 2**30), ("12GB", 12 * 10**9), ("512MiB", 512 * 2**20), ("1.5g", int(1.5 * 2**30)),
    ("25%", 25 * 2**30), (0.25, 25 * 2**30), (1.0, TOTAL), (4096, 4096), ("200GiB", TOTAL), (" 3 kb ", 3000),
])
def test_parse(spec, expected):
    assert parse_budget(spec, TOTAL) == expected


@pytest.mark.parametrize("spec, error", [
    ("", ValueError), ("GiB", ValueError), ("12 parsecs", ValueError), ("-1GiB", ValueError), ("0%", ValueError),
    ("150%", ValueError), (0.0, ValueError), (1.01, ValueError), (float("nan"), ValueError), (0, ValueError),
    (-3, ValueError), (True, TypeError), (None, TypeError), ([1], TypeError),
])
def test_parse_rejects(spec, error):
    with pytest.raises(error, match="gpu_budget"):
        parse_budget(spec, TOTAL)


def test_slots():
    assert slots_for_budget(10_000, 1000, 50, 2) == 10
    assert slots_for_budget(10**9, 1000, 50, 2) == 50  # never more slots than experts
    with pytest.raises(sida_moe.BudgetError, match=r"holds 1 expert slot\(s\).*needs 2: the minimum budget is 2000 bytes"):
        slots_for_budget(1999, 1000, 50, 2)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**30) == "3.00 GiB"


def test_describe_names_the_pool_kind_and_the_budget():
    """On the host backend the pool is plain host memory, not pinned: the summary says which."""
    import torch

    from _moe_models import tiny_model

    model = sida_moe.offload(tiny_model("qwen3_moe", torch.float32), gpu_budget=0.5, prefetch="none")
    engine = model.sida_engine
    text = engine.describe()
    kind = "pinned pool" if engine.cache.backend_kind == "cuda" else "host pool"
    assert kind in text and f"{engine.num_slots} slots" in text and "policy lru" in text
    engine.close()
