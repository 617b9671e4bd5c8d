"""GPU budget parsing and slot counts."""

import pytest

import sida_moe
from sida_moe.budget import format_bytes, parse_budget, slots_for_budget

TOTAL = 100 * 2**30


@pytest.mark.parametrize("spec, expected", [
    ("12GiB", 12 * 2**30), ("12G", 12 * 2**30), ("12GB", 12 * 10**9), ("512MiB", 512 * 2**20), ("1.5g", int(1.5 * 2**30)),
    ("25%", 25 * 2**30), (0.25, 25 * 2**30), (1.0, TOTAL), ("4096B", 4096), ("4096 b", 4096), ("200GiB", TOTAL),
    (" 3 kb ", 3000), ("0.25", 25 * 2**30), ("1", TOTAL), (1, TOTAL), ("100%", TOTAL), ("+0.5", 50 * 2**30),
    ("1e300GiB", TOTAL), (".5", 50 * 2**30), ("2.5e-1", 25 * 2**30),
])
def test_parse(spec, expected):
    assert parse_budget(spec, TOTAL) == expected


def test_parse_accepts_numpy_numbers():
    np = pytest.importorskip("numpy")
    assert parse_budget(np.float32(0.5), TOTAL) == 50 * 2**30
    assert parse_budget(np.int64(1), TOTAL) == TOTAL


@pytest.mark.parametrize("spec, error", [
    ("", ValueError), ("GiB", ValueError), ("12 parsecs", ValueError), ("-1GiB", ValueError), ("0%", ValueError),
    ("150%", ValueError), (0.0, ValueError), (1.01, ValueError), (float("nan"), ValueError), (0, ValueError),
    (-3, ValueError), (True, TypeError), (None, TypeError), ([1], TypeError), ("inf", ValueError), ("nan", ValueError),
    ("1e400", ValueError), ("1e400GiB", ValueError), ("1e400%", ValueError), (float("inf"), ValueError),
])
def test_parse_rejects(spec, error):
    with pytest.raises(error, match="gpu_budget"):
        parse_budget(spec, TOTAL)


@pytest.mark.parametrize("spec", ["2", "4096", " 12 ", "1.5", 2, 4096, 1.5, 10**30])
def test_bare_numbers_above_one_are_refused_with_a_hint(spec):
    """A unitless number is a fraction of all experts: 2 is neither 200% nor two bytes, so the
    message says to add a unit or a percent sign."""
    text = str(spec).strip()
    with pytest.raises(ValueError, match=rf"gpu_budget {spec!r} is a number above 1 without a unit.*'{text}B'.*'25%'"):
        parse_budget(spec, TOTAL)


@pytest.mark.parametrize("spec", ["-1", -1, "0", -0.5, "-25%"])
def test_non_positive_budgets_say_positive(spec):
    with pytest.raises(ValueError, match=rf"gpu_budget {spec!r} must be positive.*fraction in \(0, 1\].*'12GiB'"):
        parse_budget(spec, TOTAL)


def test_overflowing_numbers_are_value_errors():
    for spec in ("1e400", "1e400GiB", float("inf")):
        with pytest.raises(ValueError, match="not a finite number"):
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


@pytest.mark.parametrize("budget, match", [
    (4096, "number above 1 without a unit"), ("1e400", "not a finite number"), ("-1", "must be positive"),
])
def test_offload_uses_the_same_grammar(budget, match):
    from _moe_models import tiny_model

    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match=match):
        sida_moe.offload(model, gpu_budget=budget)
    assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"  # nothing moved


def test_float64_experts_are_not_called_quantized():
    import torch

    from _moe_models import tiny_model

    with pytest.raises(NotImplementedError, match=r"dtype torch.float64 are not supported yet: use bf16") as info:
        sida_moe.offload(tiny_model("qwen3_moe").to(torch.float64))
    assert "quantized" not in str(info.value)
