"""Run-time compilation of the CUDA sources in ``sida_moe/cuda`` with NVRTC (through CuPy).

Each (source, defines, GPU architecture) compiles once per machine: the cubin is cached on disk under
``$SIDA_MOE_CACHE_DIR`` or ``~/.cache/sida_moe/kernels``, keyed by a hash of the source text, the
compiler options and the NVRTC version, and loaded once per process. Kernels are launched on the
stream given by a raw ``cudaStream_t`` (PyTorch's current stream), so they order with PyTorch work
and can be captured in a CUDA graph.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    env = os.environ.get("SIDA_MOE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sida_moe" / "kernels"


@dataclass
class KernelModule:
    """A loaded CUDA module; ``launch`` runs one of its ``extern "C"`` kernels on a stream."""

    module: Any  # cupy.cuda.function.Module (kept alive: unloading would free the functions)
    functions: dict[str, Any]
    cubin_path: Path | None
    device_index: int

    def function(self, name: str) -> Any:
        fn = self.functions.get(name)
        if fn is None:
            fn = self.module.get_function(name)
            self.functions[name] = fn
        return fn

    def launch(
        self,
        name: str,
        grid: tuple[int, ...],
        block: tuple[int, ...],
        args: tuple[Any, ...],
        stream_ptr: int,
        shared_mem: int = 0,
    ) -> None:
        """Launch kernel ``name``; ``args`` are numpy scalars (pointers as ``numpy.uint64``)."""
        _launch(self.function(name), grid, block, args, shared_mem, stream_ptr)


class _RawStream:
    """What CuPy's launcher reads from a stream argument: the raw handle in ``.ptr``."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


_streams: dict[int, _RawStream] = {}


def _launch(fn: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...], shared_mem: int,
            stream_ptr: int) -> None:
    stream = _streams.get(stream_ptr)
    if stream is None:
        stream = _streams.setdefault(stream_ptr, _RawStream(stream_ptr))
    fn(grid, block, args, shared_mem=shared_mem, stream=stream)


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
        mod = KernelModule(module=module, functions={}, cubin_path=path, device_index=device_index)
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
