"""ExpertPool: exact-size arenas, 256-byte tensor alignment, writes from every buffer kind,
safetensors streaming, and clear errors on bad input."""

import json
import struct

import numpy as np
import pytest
import torch

import sida_moe as sm
from sida_moe._native import InvalidArgumentError, LoadError


@pytest.fixture(params=["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request):
    return sm.Backend(request.param)


def test_backend_kinds():
    assert sm.Backend("host").kind == "host"
    assert sm.Backend("auto").kind in ("host", "cuda")
    assert isinstance(sm.Backend.cuda_available(), bool)
    with pytest.raises(InvalidArgumentError, match="allowed"):
        sm.Backend("tpu")
    with pytest.raises(InvalidArgumentError):
        sm.Backend("host", device=-1)


def test_cuda_backend_without_cuda_raises_cuda_error():
    if sm.Backend.cuda_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(sm.CudaError):
        sm.Backend("cuda")


def test_layout_alignment_and_exact_arenas(backend):
    layout = [("gate_up", 1000), ("down", 300), ("bias", 4)]
    keys = [(l, e) for l in range(3) for e in range(5)]
    pool = sm.ExpertPool(backend, layout, keys, arena_bytes=4 * 1536)
    assert pool.tensor_offsets == {"gate_up": 0, "down": 1024, "bias": 1536}
    assert pool.tensor_nbytes == {"gate_up": 1000, "down": 300, "bias": 4}
    assert pool.expert_nbytes == 1792
    assert pool.allocated_bytes == len(keys) * pool.expert_nbytes
    assert pool.num_arenas == 5  # 3 records per arena of 4*1536 bytes
    assert pool.num_experts == 15 and pool.keys == keys
    assert pool.contains(2, 4) and not pool.contains(3, 0) and not pool.contains(-1, 0)
    assert all(pool.host_ptr(l, e) % 256 == 0 for l, e in keys)
    assert pool.read(1, 1) == bytes(pool.expert_nbytes)  # zeroed
    pool.close()
    assert pool.closed and pool.allocated_bytes == 0
    pool.close()  # idempotent


def test_write_from_every_buffer_kind(backend):
    pool = sm.ExpertPool(backend, [("w", 64), ("b", 16)], [(0, 0), (0, 1)])
    pool.write(0, 0, "w", bytes(range(64)))
    assert pool.read(0, 0, "w") == bytes(range(64))
    pool.write(0, 0, "w", bytearray(b"\x07" * 64))
    assert pool.read(0, 0, "w") == b"\x07" * 64
    arr = np.arange(16, dtype=np.float32)  # 64 bytes, any dtype
    pool.write(0, 1, "w", arr)
    assert pool.read(0, 1, "w") == arr.tobytes()
    t = torch.arange(8, dtype=torch.bfloat16)  # 16 bytes
    pool.write(0, 1, "b", t)
    assert pool.read(0, 1, "b") == t.view(torch.uint8).numpy().tobytes()
    pool.write(0, 1, "b", memoryview(b"z" * 16))
    assert pool.read(0, 1, "b") == b"z" * 16
    src = torch.full((64,), 3, dtype=torch.uint8)
    pool.write_ptr(0, 0, "w", src.data_ptr(), 64)
    assert pool.read(0, 0, "w") == b"\x03" * 64
    whole = pool.read(0, 0)
    assert len(whole) == pool.expert_nbytes and whole[:64] == b"\x03" * 64
    pool.close()


def test_write_bad_input_leaves_pool_intact(backend):
    pool = sm.ExpertPool(backend, [("w", 64)], [(0, 0)])
    pool.write(0, 0, "w", b"a" * 64)
    with pytest.raises(InvalidArgumentError, match="64 bytes"):
        pool.write(0, 0, "w", b"a" * 63)
    with pytest.raises(sm.UnknownExpertError, match="tensor"):
        pool.write(0, 0, "nope", b"a" * 64)
    with pytest.raises(sm.UnknownExpertError):
        pool.write(0, 1, "w", b"a" * 64)
    with pytest.raises(sm.UnknownExpertError):
        pool.write(-1, 0, "w", b"a" * 64)
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        pool.write(0, 0, "w", torch.zeros(8, 16, dtype=torch.uint8).t())
    with pytest.raises(InvalidArgumentError):
        pool.write(0, 0, "w", np.zeros((16, 8), np.uint8)[:, ::2])
    with pytest.raises(InvalidArgumentError):
        pool.write(0, 0, "w", 12345)
    with pytest.raises(InvalidArgumentError):
        pool.write_ptr(0, 0, "w", 0, 64)
    with pytest.raises(InvalidArgumentError):
        pool.write_ptr(0, 0, "w", 4096, -1)
    assert pool.read(0, 0, "w") == b"a" * 64
    pool.close()
    with pytest.raises(sm.ClosedError):
        pool.read(0, 0)
    with pytest.raises(sm.ClosedError):
        pool.write(0, 0, "w", b"a" * 64)


@pytest.mark.parametrize(
    "layout, keys, arena, exc",
    [
        ([], [(0, 0)], 1 << 20, InvalidArgumentError),
        ([("w", 0)], [(0, 0)], 1 << 20, InvalidArgumentError),
        ([("w", -5)], [(0, 0)], 1 << 20, InvalidArgumentError),
        ([("w", 8), ("w", 8)], [(0, 0)], 1 << 20, InvalidArgumentError),
        ([("w", 8)], [(0, -1)], 1 << 20, InvalidArgumentError),
        ([("w", 8)], [(0, 0), (0, 0)], 1 << 20, InvalidArgumentError),
        ([("w", 1000)], [(0, 0)], 100, InvalidArgumentError),
    ],
)
def test_constructor_bad_input(layout, keys, arena, exc):
    with pytest.raises(exc):
        sm.ExpertPool(sm.Backend("host"), layout, keys, arena_bytes=arena)


def _write_safetensors(path, tensors: dict[str, np.ndarray]):
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, a in tensors.items():
        b = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_load_safetensors_streams_slices(backend, tmp_path):
    # A fused [E, 2I, H] tensor split into per-expert records, plus a plain per-expert tensor.
    E, I2, H = 3, 4, 8
    fused = np.random.default_rng(0).standard_normal((E, I2, H)).astype(np.float32)
    down = np.random.default_rng(1).standard_normal((E, H, 2)).astype(np.float32)
    path = tmp_path / "m.safetensors"
    _write_safetensors(path, {"gate_up": fused, "down": down})
    pool = sm.ExpertPool(backend, [("gate_up", I2 * H * 4), ("down", H * 2 * 4)], [(5, e) for e in range(E)])
    per = I2 * H * 4
    entries = [("gate_up", 5, e, "gate_up", e * per, per, 0) for e in range(E)]
    entries += [("down", 5, e, "down", e * H * 8, H * 8, 0) for e in range(E)]
    assert pool.load_safetensors(str(path), entries) == E * (per + H * 8)
    for e in range(E):
        assert pool.read(5, e, "gate_up") == fused[e].tobytes()
        assert pool.read(5, e, "down") == down[e].tobytes()
    # Partial copy at an offset.
    pool.load_safetensors(str(path), [("gate_up", 5, 0, "down", 0, 16, 32)])
    assert pool.read(5, 0, "down")[32:48] == fused.tobytes()[:16]
    pool.close()


def test_load_safetensors_errors_name_the_problem(tmp_path):
    path = tmp_path / "m.safetensors"
    _write_safetensors(path, {"t": np.zeros(4, np.float32)})
    pool = sm.ExpertPool(sm.Backend("host"), [("w", 16)], [(0, 0)])
    with pytest.raises(LoadError, match="no tensor 'x'|no tensor \"x\""):
        pool.load_safetensors(str(path), [("x", 0, 0, "w", 0, 16, 0)])
    with pytest.raises(LoadError, match="cannot open"):
        pool.load_safetensors(str(tmp_path / "missing.safetensors"), [])
    with pytest.raises(InvalidArgumentError, match="outside the file tensor"):
        pool.load_safetensors(str(path), [("t", 0, 0, "w", 8, 16, 0)])
    with pytest.raises(InvalidArgumentError, match="outside the pool tensor"):
        pool.load_safetensors(str(path), [("t", 0, 0, "w", 0, 16, 4)])
    with pytest.raises(sm.UnknownExpertError, match="entry 0"):
        pool.load_safetensors(str(path), [("t", 1, 0, "w", 0, 16, 0)])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(LoadError, match="not a valid safetensors"):
        pool.load_safetensors(str(bad), [])
    bad.write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(LoadError, match="JSON"):
        pool.load_safetensors(str(bad), [])
    assert pool.read(0, 0) == bytes(pool.expert_nbytes)
    pool.close()


@pytest.mark.gpu
def test_cuda_backend_keeps_its_context_when_another_backend_is_dropped():
    """Each Backend holds one retain of the primary context. Run in a fresh process where torch has
    not initialised CUDA, so that no other retain hides a release too many."""
    import subprocess
    import sys

    code = (
        "import sida_moe as sm\n"
        "a = sm.Backend('cuda')\n"
        "b = sm.Backend('cuda'); del b\n"
        "p = sm.ExpertPool(a, [('w', 4096)], [(0, 0)])\n"
        "p.write(0, 0, 'w', b'\\x09' * 4096)\n"
        "c = sm.SlotCache(p, 1)\n"
        "s = c.acquire(0, [0])\n"
        "assert c.read_slot(s[0])[:4096] == b'\\x09' * 4096\n"
        "c.release(s); c.close(); p.close()\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
