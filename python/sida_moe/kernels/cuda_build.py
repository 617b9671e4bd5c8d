"""Run-time compilation of the CUDA sources in ``sida_moe/cuda`` with NVRTC (through CuPy).

Each (source, defines, GPU architecture) compiles once per machine: the cubin is cached on disk under
``$SIDA_MOE_CACHE_DIR`` or ``~/.cache/sida_moe/kernels``, keyed by a hash of the source text, the
compiler options and the NVRTC version, and loaded once per process. Kernels are launched on the
stream given by a raw ``cudaStream_t`` (PyTorch's current stream), so they order with PyTorch work
and can be captured in a CUDA graph.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sida_moe.environment import environment

CUDA_SOURCE_DIR = Path(__file__).resolve().parent.parent / "cuda"

_lock = threading.Lock()
_modules: dict[tuple[Any, ...], KernelModule] = {}
_cupy_state: dict[str, Any] = {}


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message carries the compiler log."""


def cupy_import_error() -> str | None:
    """Why CuPy (with a working NVRTC) cannot be used here, or None when it can. Never raises."""
    if "error" not in _cupy_state:
        try:
            import cupy  # noqa: F401
            from cupy_backends.cuda.libs import nvrtc

            nvrtc.getVersion()
            _cupy_state["error"] = None
        except Exception as exc:  # ImportError, or a CuPy whose CUDA libraries do not load
            _cupy_state["error"] = f"{type(exc).__name__}: {exc}"
    return _cupy_state["error"]


def cache_dir() -> Path:
    """Directory of the cubin cache (created on first use)."""
    return environment().kernel_cache_dir


# Dynamic shared memory a launch gets without opting in (48 KiB less the kernel's static shared
# memory; 32 KiB keeps clear of any kernel here). Past it the launcher raises the function's limit.
_DEFAULT_DYNAMIC_SMEM = 32 * 1024
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


def _opt_in_dynamic_smem(fn_ptr: int, nbytes: int) -> None:
    """``cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)``: without it a launch asking for more
    than 48 KiB fails with CUDA_ERROR_INVALID_VALUE."""
    libcuda = ctypes.CDLL("libcuda.so.1")
    rc = libcuda.cuFuncSetAttribute(
        ctypes.c_void_p(fn_ptr), ctypes.c_int(_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES), ctypes.c_int(nbytes)
    )
    if rc != 0:
        raise RuntimeError(f"cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, {nbytes}) failed with CUresult {rc}")


class _Launcher:
    """One kernel's ``cuLaunchKernel`` argument block, built once: every argument has an 8-byte
    slot (a 32-bit argument uses the low 4 bytes, little-endian) and the ``void*`` array points at
    the slots. A launch packs the values and calls the driver: a few microseconds of host time,
    against over ten through CuPy's generic argument conversion."""

    __slots__ = ("fn", "fn_ptr", "values", "params", "params_ptr", "pack", "lock", "dynamic_smem_limit")

    def __init__(self, fn: Any, nargs: int) -> None:
        self.fn = fn  # keeps the CuPy function (and its module) alive
        self.fn_ptr = fn.ptr
        self.dynamic_smem_limit = _DEFAULT_DYNAMIC_SMEM
        self.values = (ctypes.c_int64 * nargs)()
        base = ctypes.addressof(self.values)
        self.params = (ctypes.c_void_p * nargs)(*[base + 8 * i for i in range(nargs)])
        self.params_ptr = ctypes.addressof(self.params)
        self.pack = struct.Struct("<" + "q" * nargs).pack_into
        self.lock = threading.Lock()  # the slots are shared: one launch at a time per kernel

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[int, ...], shared_mem: int,
                 stream_ptr: int) -> None:
        from cupy_backends.cuda.api import driver

        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        bx, by, bz = (tuple(block) + (1, 1))[:3]
        with self.lock:
            if shared_mem > self.dynamic_smem_limit:
                _opt_in_dynamic_smem(self.fn_ptr, shared_mem)
                self.dynamic_smem_limit = shared_mem
            self.pack(self.values, 0, *args)
            driver.launchKernel(self.fn_ptr, gx, gy, gz, bx, by, bz, shared_mem, stream_ptr, self.params_ptr, 0)


@dataclass
class KernelModule:
    """A loaded CUDA module; ``launch`` runs one of its ``extern "C"`` kernels on a stream."""

    module: Any  # cupy.cuda.function.Module (kept alive: unloading would free the functions)
    launchers: dict[str, _Launcher]
    cubin_path: Path | None
    device_index: int

    def launch(
        self,
        name: str,
        grid: tuple[int, ...],
        block: tuple[int, ...],
        args: tuple[int, ...],
        stream_ptr: int,
        shared_mem: int = 0,
    ) -> None:
        """Launch kernel ``name`` on the raw stream handle ``stream_ptr``. ``args`` are Python ints,
        one per kernel parameter (pointers as addresses); every parameter must be a pointer or an
        integer of 4 or 8 bytes."""
        launcher = self.launchers.get(name)
        if launcher is None:
            launcher = _Launcher(self.module.get_function(name), len(args))
            self.launchers[name] = launcher
        launcher(grid, block, args, shared_mem, stream_ptr)


def _arch_options(capability: tuple[int, int]) -> tuple[str, bool]:
    """NVRTC target for a device: ``(option, is_cubin)``. Real-architecture cubin when NVRTC knows the
    device (``sm_90a`` on Hopper), otherwise PTX of the newest architecture it knows (the driver
    compiles it for the device)."""
    from cupy_backends.cuda.libs import nvrtc

    cc = capability[0] * 10 + capability[1]
    try:
        supported = set(nvrtc.getSupportedArchs())
    except Exception:
        supported = {cc}
    if cc in supported:
        suffix = "a" if capability[0] == 9 else ""
        return f"--gpu-architecture=sm_{cc}{suffix}", True
    newest = max(a for a in supported if a <= cc) if any(a <= cc for a in supported) else min(supported)
    return f"--gpu-architecture=compute_{newest}", False


def _compile(source: str, name: str, options: list[str], is_cubin: bool) -> bytes:
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise KernelCompileError(f"NVRTC failed on {name} with options {options}:\n{log}") from exc
        if not is_cubin:
            return nvrtc.getPTX(prog)
        # CuPy strips what it takes for a trailing NUL from the cubin; the ELF's last byte (the high
        # byte of its last program header's alignment) is zero: restore it so the file is whole.
        return nvrtc.getCUBIN(prog) + b"\0"

    finally:
        nvrtc.destroyProgram(prog)


def load_module(source_name: str, defines: dict[str, int | float | str], device_index: int) -> KernelModule:
    """Compile (or fetch from the caches) ``cuda/<source_name>`` with ``-D`` defines for a device.

    Raises ``KernelCompileError`` with the NVRTC log when the source does not compile, and
    ``RuntimeError`` when CuPy is unusable (see ``cupy_import_error``).
    """
    err = cupy_import_error()
    if err is not None:
        raise RuntimeError(f"CUDA kernels need CuPy with NVRTC (pip install sida-moe[cuda13]): {err}")
    import cupy
    import torch
    from cupy_backends.cuda.libs import nvrtc

    capability = torch.cuda.get_device_capability(device_index)
    key = (source_name, tuple(sorted(defines.items())), capability)
    mod = _modules.get(key)
    if mod is not None:
        return mod
    with _lock:
        mod = _modules.get(key)
        if mod is not None:
            return mod
        source = (CUDA_SOURCE_DIR / source_name).read_text()
        arch_opt, is_cubin = _arch_options(capability)
        options = ["--std=c++17", arch_opt]
        options += [f"-D{k}={v}" for k, v in sorted(defines.items())]
        digest = hashlib.sha256()
        for part in (source, "\0".join(options), repr(nvrtc.getVersion())):
            digest.update(part.encode())
            digest.update(b"\0")
        stem = Path(source_name).stem
        path = cache_dir() / f"{stem}-sm{capability[0]}{capability[1]}-{digest.hexdigest()[:32]}.{'cubin' if is_cubin else 'ptx'}"
        image: bytes | None = None
        try:
            image = path.read_bytes()
        except OSError:
            image = None
        if not image:
            image = _compile(source, source_name, options, is_cubin)
            _write_atomic(path, image)
        with cupy.cuda.Device(device_index):
            module = cupy.cuda.function.Module()
            module.load(image)
        mod = KernelModule(module=module, launchers={}, cubin_path=path, device_index=device_index)
        _modules[key] = mod
        return mod


def _write_atomic(path: Path, data: bytes) -> None:
    """Write the cache entry so that concurrent processes never read a half-written file; a
    read-only cache directory only costs a recompile next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        pass


__all__ = ["CUDA_SOURCE_DIR", "KernelCompileError", "KernelModule", "cache_dir", "cupy_import_error", "load_module"]
