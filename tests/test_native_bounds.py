"""Every size a Python caller hands the native runtime is bounded: out-of-range sizes raise a
ValueError that names the allowed range, legal sizes that cannot be allocated raise MemoryError.

Each case runs in a child interpreter: a regression (an allocation abort, exit status 134) then
fails its test instead of killing pytest."""

import json
import struct
import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import sida_moe as sm
def report(fn):
    try:
        r = fn()
    except BaseException as e:
        print("RAISED", type(e).__name__, "|".join(c.__name__ for c in type(e).__mro__), str(e), sep="\\n")
    else:
        print("RETURNED", repr(r), sep="\\n")
pool = sm.ExpertPool(sm.Backend("host"), [("a", 100)], [(0, 0)])
"""


def run_isolated(code: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"the child interpreter died (status {proc.returncode}):\n{proc.stderr[-2000:]}"
    return proc.stdout.splitlines()


def raised(code: str) -> tuple[str, list[str], str]:
    out = run_isolated(code)
    assert out[0] == "RAISED", f"no exception; returned {out[1:]}"
    return out[1], out[2].split("|"), out[3]


@pytest.mark.parametrize("num_slots", [2**31, 10**6, 2])
def test_num_slots_beyond_the_pool_is_a_budget_error(num_slots):
    name, mro, msg = raised(f"report(lambda: sm.SlotCache(pool, {num_slots}))")
    assert name == "BudgetError" and "ValueError" in mro
    assert "1..=1" in msg and str(num_slots) in msg


@pytest.mark.parametrize("capacity", [2**40, 2**21])
def test_queue_capacity_is_bounded(capacity):
    name, mro, msg = raised(f"report(lambda: sm.SlotCache(pool, 1, queue_capacity={capacity}))")
    assert name == "InvalidArgumentError" and "ValueError" in mro
    assert "queue_capacity must be in 1..=1048576" in msg


def test_copy_workers_bound_is_exported_and_enforced():
    out = run_isolated("""
        from sida_moe._native import MAX_COPY_WORKERS
        print(MAX_COPY_WORKERS)
        report(lambda: sm.SlotCache(pool, 1, copy_workers=MAX_COPY_WORKERS + 1))
    """)
    assert out[0] == "64" and out[1] == "RAISED" and out[2] == "InvalidArgumentError"


def test_simulate_with_a_huge_budget_equals_everything_resident():
    out = run_isolated("""
        trace = [(0, [i % 5, (i + 1) % 5]) for i in range(40)]
        print(sm.simulate_policy("lru", 5, trace) == sm.simulate_policy("lru", 2**40, trace) == sm.simulate_policy("lru", 2**63 - 1, trace))
        report(lambda: sm.simulate_policy("lru", 2**40, []))
    """)
    assert out[0] == "True"
    assert out[1:] == ["RETURNED", "{'hits': 0, 'misses': 0, 'evictions': 0, 'loads': 0, 'prefetches': 0, 'prefetch_used': 0}"]


@pytest.mark.parametrize("method", ["submit_predicted", "submit_routed"])
def test_deferred_id_count_is_bounded(method):
    # the ids buffer is 16 bytes: a width beyond the limit must be refused before it is read
    call = {
        "submit_predicted": "f.submit_predicted(ids.data_ptr(), [0], 2**40)",
        "submit_routed": "f.submit_routed(ids.data_ptr(), [0], 2**40)",
    }[method]
    name, mro, msg = raised(f"""
        import torch
        ids = torch.zeros(2, dtype=torch.int64)
        c = sm.SlotCache(pool, 1)
        f = sm.RoutingFeed(c)
        report(lambda: {call})
    """)
    assert name == "InvalidArgumentError" and "ValueError" in mro
    assert "16777216 ids" in msg


def test_a_legal_size_that_cannot_be_allocated_is_a_memory_error():
    # 4 EiB: a legal layout, but beyond any address space
    name, mro, msg = raised('report(lambda: sm.ExpertPool(sm.Backend("host"), [("a", 2**62)], [(0, 0)], 2**62))')
    assert name == "OutOfMemoryError" and "MemoryError" in mro and "SidaMoeError" in mro
    assert str(2**62) in msg


def _safetensors(path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("offsets", [[2**64 - 100, 2**64 - 1], [2**64 - 64, 2**64 - 1], [0, 2**64 - 1]])
def test_wrapping_data_offsets_are_refused(tmp_path, offsets):
    path = tmp_path / "evil.safetensors"
    _safetensors(path, {"w": {"dtype": "U8", "shape": [offsets[1] - offsets[0]], "data_offsets": offsets}}, bytes(64))
    out = run_isolated(f"""
        report(lambda: pool.load_safetensors({str(path)!r}, [("w", 0, 0, "a", 0, 64, 0)]))
        print(pool.read(0, 0, "a") == bytes(100))
    """)
    assert out[:2] == ["RAISED", "LoadError"], out
    assert str(path) in out[3] and "data_offsets" in out[3] and '"w"' in out[3]
    assert out[4] == "True"  # nothing (no header bytes) was copied into the expert


def test_offsets_that_disagree_with_dtype_and_shape_are_refused(tmp_path):
    path = tmp_path / "short.safetensors"
    _safetensors(path, {"w": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 64]}}, bytes(64))
    name, _, msg = raised(f'report(lambda: pool.load_safetensors({str(path)!r}, [("w", 0, 0, "a", 0, 64, 0)]))')
    assert name == "LoadError" and str(path) in msg and "need 128" in msg
