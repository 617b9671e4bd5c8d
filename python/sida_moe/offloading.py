"""Public entry points: ``offload`` a loaded Hugging Face MoE model, or build one ``from_pretrained``
with its experts streamed from safetensors straight into the pinned pool."""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from sida_moe._native import LoadError
from sida_moe.adapters import Adapter, MoELayer
from sida_moe.budget import BudgetSpec
from sida_moe.engine import OffloadEngine
from sida_moe.engine_builder import FLOAT_DTYPES, EngineBuilder, discover, parameters_on_meta
from sida_moe.format import ExpertFormat
from sida_moe.prefetchers import Prefetcher
from sida_moe.serving_config import ServingConfig


def _check_dtype(model: nn.Module, fmt: ExpertFormat) -> None:
    embed = model.get_input_embeddings()
    dense = getattr(embed, "weight", None)
    if isinstance(dense, torch.Tensor) and dense.dtype != fmt.dtype:
        raise ValueError(
            f"mismatched dtype: the experts are {fmt.dtype} but the model computes in {dense.dtype}; "
            f"cast the whole model first (model.to({dense.dtype}))"
        )


def engine_of(model: nn.Module) -> OffloadEngine:
    """The :class:`OffloadEngine` of a model returned by ``offload`` / ``from_pretrained``."""
    engine = getattr(model, "sida_engine", None)
    if not isinstance(engine, OffloadEngine):
        raise ValueError("this model was not offloaded by sida_moe (no sida_engine attribute)")
    return engine


# ----------------------------------------------------------------------------------- offload
def offload(
    model: nn.Module,
    gpu_budget: BudgetSpec = "12GiB",
    policy: str = "lru",
    prefetch: str | Prefetcher | None = "next_layer_gate",
    backend: str = "auto",
    copy_workers: int = 2,
    progress: bool = False,
) -> nn.Module:
    """Move the experts of a loaded transformers (>= 5) MoE model into a pinned host pool and serve
    them from a GPU slot cache of ``gpu_budget`` bytes. Returns the same model, modified in place.

    - ``gpu_budget``: a fraction ``0.25`` of all experts, a percent ``"25%"`` or a size with a unit
      ``"12GiB"`` / ``"512MB"`` / ``"4096B"`` (a bare number above 1 is refused; see ``parse_budget``).
      BudgetError if fewer slots than one layer's top-k fit (the message gives the minimum).
    - ``policy``: slot eviction, ``"lru" | "lfu" | "fifo" | "predictive"``.
    - ``prefetch``: ``"next_layer_gate"`` (apply layer L+1's router after layer L), ``"none"``, or a
      :class:`~sida_moe.prefetchers.Prefetcher` (e.g. the SiDA predictor).
    - ``backend``: ``"auto"`` (CUDA slots when the model is on a GPU, host slots on the CPU),
      ``"cuda"`` or ``"host"``.

    Every option is checked before the model is touched (``ServingConfig.resolve``); the engine
    keeps what it was built with (``model.sida_engine.config``).

    Routers, attention, norms, embeddings and shared experts stay where they are; each experts module
    is replaced by :class:`~sida_moe.experts.OffloadedExperts` and its weights are freed. Exact: the
    outputs equal the original model's within the dtype's rounding.

    On CUDA, ``model.generate`` then replays each decode step of a plain greedy or sampled call
    from a CUDA graph (``sida_moe.decode_graph``); ``sida_graphs=False`` keeps transformers' loop,
    ``sida_compile=True`` compiles the step first (``torch.compile``: faster steps, a compile of
    about a minute per batch size on a large model).
    """
    options = ServingConfig.resolve(gpu_budget, policy, prefetch, backend, copy_workers, progress)
    found = discover(model)
    adapter, layers, fmt = found
    params = [p for layer in layers for p in layer.experts.parameters()]
    if any(p.is_meta for p in params):
        raise ValueError(
            "the model's experts are on the meta device (no weights): load real weights first, or build it with "
            "sida_moe.from_pretrained(path, ...)"
        )
    _check_dtype(model, fmt)
    devices = {p.device for p in params}
    del params  # holding them would keep every original expert alive until offload returns
    if len(devices) != 1:
        raise ValueError(f"the experts are spread over several devices {sorted(map(str, devices))}; put the model on one device")
    device = devices.pop()
    builder = EngineBuilder(model, device, options, found=found)
    engine = builder.engine
    # All or nothing: until offload returns, every change to the model is recorded here and
    # undone on any failure or interrupt, so the caller keeps a working original model.
    swapped: list[tuple[MoELayer, nn.Module]] = []
    released: list[tuple[MoELayer, list[tuple[nn.Parameter, torch.Size]]]] = []
    try:
        from tqdm.auto import tqdm

        # every expert reaches the pool before the model changes at all
        for layer in tqdm(layers, desc="offloading experts", unit="layer", disable=not progress):
            for expert in range(layer.num_experts):
                engine.write_expert(layer.ordinal, expert, adapter.expert_weights(layer, expert))
        restorable = all(_restorable(adapter, layer, fmt) for layer in layers)
        swapped.extend(builder.replace_experts())
        if restorable:
            # free the originals before the slot memory is allocated (it may need their room); a
            # failure from here on writes them back from the pool
            for layer, original in swapped:
                _release_storage(original, layer, released)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        builder.start()
    except BaseException:
        _put_back(model, engine, adapter, fmt, swapped, released)
        raise
    if not restorable:
        for _, original in swapped:
            _release_storage(original)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return model


def _restorable(adapter: Adapter, layer: MoELayer, fmt: ExpertFormat) -> bool:
    """True when the adapter can write the layer's original parameters back from the pool: it has
    the inverse of ``expert_weights``, and the canonical tensors hold every parameter element."""
    if type(adapter).write_expert_weights is Adapter.write_expert_weights:
        return False
    per_expert = sum(math.prod(shape) for shape in fmt.tensor_shapes().values())
    return sum(p.numel() for p in layer.experts.parameters()) == per_expert * layer.num_experts


def _release_storage(module: nn.Module, layer: MoELayer | None = None,
                     record: list[tuple[MoELayer, list[tuple[nn.Parameter, torch.Size]]]] | None = None) -> None:
    """Free the weights of a replaced experts module now, even if something outside the model still
    holds its Parameter objects (hooks of other libraries, user references): their storage is what
    the budget is about. ``record`` gets each parameter's shape first, for ``_put_back``."""
    params = list(module.parameters())
    if record is not None:
        record.append((layer, [(p, p.shape) for p in params]))
    with torch.no_grad():
        for param in params:
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
            param.grad = None


def _put_back(model: nn.Module, engine: OffloadEngine, adapter: Adapter, fmt: ExpertFormat,
              swapped: list[tuple[MoELayer, nn.Module]],
              released: list[tuple[MoELayer, list[tuple[nn.Parameter, torch.Size]]]]) -> None:
    """Undo a failed ``offload``: the original experts modules go back, their released weights are
    written back from the pool, then the engine is closed."""
    engine.close_cache()  # its slot memory may be the room the weights need
    if "_sida_original_generate" in model.__dict__:  # install_generate ran
        original = model.__dict__.pop("_sida_original_generate")
        if getattr(original, "__func__", None) is getattr(type(model), "generate", None):
            model.__dict__.pop("generate", None)  # the class's own generate again
        else:
            model.generate = original
    for layer, original in swapped:
        setattr(layer.block, layer.experts_attr, original)
    for layer, params in released:
        with torch.no_grad():
            for param, shape in params:
                if param.shape != shape:
                    param.data = torch.empty(shape, dtype=param.dtype, device=param.device)
        for expert in range(layer.num_experts):
            adapter.write_expert_weights(layer, expert, _pool_tensors(engine, fmt, layer.ordinal, expert))
    engine.close()


def _pool_tensors(engine: OffloadEngine, fmt: ExpertFormat, moe_layer: int, expert: int) -> dict[str, torch.Tensor]:
    """One expert's canonical tensors, copied out of the pool onto the engine's device."""
    out = {}
    for name, shape in fmt.tensor_shapes().items():
        raw = torch.frombuffer(bytearray(engine.pool.read(moe_layer, expert, name)), dtype=torch.uint8)
        out[name] = raw.view(fmt.dtype).view(shape).to(engine.device)
    return out


# --------------------------------------------------------------------------- from_pretrained
def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            data = json.loads(index.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LoadError(f"{index}: not a valid safetensors index (invalid JSON: {e})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) and v for v in weight_map.values()):
            raise LoadError(f"{index}: not a valid safetensors index (it needs a non-empty \"weight_map\" object "
                            f"mapping tensor names to shard file names)")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in {path}: {missing[:3]}")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path} (expected model.safetensors or an index)")
    return files


def _open_shard(file: Path):
    """``safe_open`` of one weights file; a corrupt file raises LoadError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), "pt")
    except SafetensorError as e:
        raise LoadError(f"{file}: not a valid safetensors file: {e}") from None


def _resolve_dtype(dtype: torch.dtype | str | None, config) -> torch.dtype:
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use 'bfloat16', 'float16' or 'float32'")
        dtype = resolved
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    return dtype


def _model_class(config):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModelForCausalLM


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def from_pretrained(
    path: str | Path,
    gpu_budget: BudgetSpec = "12GiB",
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    policy: str = "lru",
    prefetch: str | Prefetcher | None = "next_layer_gate",
    backend: str = "auto",
    copy_workers: int = 2,
    progress: bool = True,
) -> nn.Module:
    """Build a transformers MoE model from a local checkpoint directory without materialising its
    experts: they stream from the safetensors files into the pinned pool (natively, or through one
    reusable buffer where a family needs a transform or a dtype conversion); dense weights load to
    ``device``. Peak host RAM is about the experts' size plus one dense tensor; peak GPU memory
    about the dense weights plus the budget. Other arguments as in :func:`offload`.
    """
    import transformers

    # every argument is checked before a weight is read
    options = ServingConfig.resolve(gpu_budget, policy, prefetch, backend, copy_workers, progress)
    device = _resolve_device(device)
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (from_pretrained reads local save_pretrained output)")
    config = transformers.AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None):
        raise NotImplementedError("quantized checkpoints are not supported yet: use a bf16, fp16 or fp32 checkpoint")
    dtype = _resolve_dtype(dtype, config)
    files = _safetensors_files(path)
    cls = _model_class(config)
    with parameters_on_meta():
        model = cls._from_config(config, dtype=dtype) if hasattr(cls, "_from_config") else cls.from_config(config, dtype=dtype)
    model.eval()
    found = discover(model)
    adapter, layers, fmt = found

    renames = [(re.compile(p), r) for p, r in adapter.checkpoint_renames]
    location: dict[str, tuple[Path, str]] = {}  # module-side name -> (file, on-disk name)
    shapes: dict[str, tuple[int, ...]] = {}  # on-disk name -> shape, from the headers
    for file in files:
        with _open_shard(file) as f:
            for key in f.keys():
                name = key
                for pattern, repl in renames:
                    name = pattern.sub(repl, name)
                location[name] = (file, key)
                shapes[key] = tuple(f.get_slice(key).get_shape())
    names = set(location)
    expert_prefixes = tuple(f"{layer.path}." for layer in layers)
    _check_dense_shapes(model, location, shapes, expert_prefixes)

    builder = EngineBuilder(model, device, options, found=found)
    try:
        _load_experts(builder.engine, adapter, layers, fmt, location, names, progress)
        builder.replace_experts()
        _load_dense(model, location, expert_prefixes, dtype, device, progress)
        return builder.start()
    except BaseException:
        builder.abandon()
        raise


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device, got {device}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} was asked for, but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _dense_target(name: str, state_names: set[str], prefix: str) -> str | None:
    """The model's parameter / buffer a module-side checkpoint name loads into (None: unused)."""
    if name in state_names:
        return name
    return f"{prefix}.{name}" if f"{prefix}.{name}" in state_names else None


def _check_dense_shapes(model: nn.Module, location: dict[str, tuple[Path, str]], shapes: dict[str, tuple[int, ...]],
                        expert_prefixes: tuple[str, ...]) -> None:
    """Every dense checkpoint tensor has the shape the model built from the config expects."""
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()} | {n: tuple(b.shape) for n, b in model.named_buffers()}
    prefix = getattr(model, "base_model_prefix", "")
    for name, (file, key) in location.items():
        if name.startswith(expert_prefixes):
            continue
        target = _dense_target(name, set(expected), prefix)
        if target is not None and shapes[key] != expected[target]:
            raise ValueError(f"checkpoint tensor {key!r} in {file} has shape {list(shapes[key])}, but the config "
                             f"makes {target!r} {list(expected[target])}")


def _load_experts(engine: OffloadEngine, adapter: Adapter, layers: list[MoELayer], fmt: ExpertFormat,
                  location: dict[str, tuple[Path, str]], names: set[str], progress: bool) -> None:
    from tqdm.auto import tqdm

    pool = engine.pool
    tensor_nbytes = pool.tensor_nbytes
    item = fmt.itemsize
    native: dict[tuple[Path, int], list[tuple]] = defaultdict(list)  # (file, layer) -> entries
    python: dict[tuple[int, int, str], list[tuple]] = defaultdict(list)  # (layer, expert, tensor) -> pieces
    meta: dict[str, tuple[torch.dtype, list[int]]] = {}
    handles = {}
    try:
        for file in {f for f, _ in location.values()}:
            handles[file] = _open_shard(file)
        for layer in layers:
            for expert in range(layer.num_experts):
                for piece in adapter.checkpoint_pieces(layer, expert, fmt, names):
                    file, key = location[piece.name]
                    if key not in meta:
                        sl = handles[file].get_slice(key)
                        meta[key] = (getattr(torch, _SAFETENSORS_DTYPES.get(sl.get_dtype(), "uint8")), sl.get_shape())
                    disk_dtype, shape = meta[key]
                    if piece.shape is not None and tuple(shape) != piece.shape:
                        raise ValueError(f"checkpoint tensor {key!r} in {file} has shape {list(shape)}, but the config "
                                         f"makes it {list(piece.shape)} (expert tensor {piece.tensor!r} of MoE layer "
                                         f"{layer.ordinal}, {layer.path})")
                    per = 1
                    for d in shape[1:] if piece.index is not None else shape:
                        per *= d
                    if piece.transform is None and disk_dtype == fmt.dtype:
                        nbytes = per * item
                        if piece.dst_offset + nbytes > tensor_nbytes[piece.tensor]:
                            raise ValueError(f"checkpoint tensor {key} ({shape}) does not fit expert tensor {piece.tensor!r} of {fmt}")
                        src = 0 if piece.index is None else piece.index * nbytes
                        native[(file, layer.ordinal)].append((key, layer.ordinal, expert, piece.tensor, src, nbytes, piece.dst_offset))
                    else:
                        python[(layer.ordinal, expert, piece.tensor)].append((file, key, piece))
        total = sum(e[5] for entries in native.values() for e in entries) + sum(tensor_nbytes[t] for _, _, t in python)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading experts", disable=not progress)
        for (file, _), entries in native.items():
            bar.update(pool.load_safetensors(str(file), entries))
        # Python path: assemble each canonical tensor (its pieces may sit in different shards) in one
        # reusable buffer, then copy it into the pool
        buffers = {name: torch.empty(n, dtype=torch.uint8) for name, n in tensor_nbytes.items()}
        for (moe_layer, expert, tensor), pieces in python.items():
            buf = buffers[tensor]
            filled = 0
            for file, key, piece in pieces:
                sl = handles[file].get_slice(key)
                t = sl[piece.index] if piece.index is not None else sl[:]
                if piece.transform is not None:
                    t = piece.transform(t)
                raw = t.to(fmt.dtype).contiguous().view(-1).view(torch.uint8)
                if piece.dst_offset + raw.numel() > buf.numel():
                    raise ValueError(f"checkpoint tensor {key} does not fit expert tensor {tensor!r} of {fmt}")
                buf[piece.dst_offset : piece.dst_offset + raw.numel()].copy_(raw)
                filled += raw.numel()
            if filled != buf.numel():
                raise ValueError(f"checkpoint pieces fill {filled} of {buf.numel()} bytes of expert ({moe_layer}, {expert}) {tensor!r}")
            pool.write_ptr(moe_layer, expert, tensor, buf.data_ptr(), buf.numel())
            bar.update(buf.numel())
        bar.close()
    finally:
        handles.clear()


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64", "I32": "int32",
                       "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _load_dense(model: nn.Module, location: dict[str, tuple[Path, str]], expert_prefixes: tuple[str, ...],
                dtype: torch.dtype, device: torch.device, progress: bool) -> None:
    from tqdm.auto import tqdm

    state_names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    prefix = getattr(model, "base_model_prefix", "")
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules_strict", None) or []) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
    unexpected = []
    for name, (file, key) in location.items():
        if name.startswith(expert_prefixes):
            continue
        target = _dense_target(name, state_names, prefix)
        if target is None:
            unexpected.append(key)
            continue
        by_file[file].append((target, key))
    loaded: set[str] = set()
    for file, items in tqdm(by_file.items(), desc="loading dense weights", unit="file", disable=not progress):
        with _open_shard(file) as f:
            for target, key in items:
                t = f.get_tensor(key)
                if t.is_floating_point():
                    fp32 = dtype != torch.float32 and any(k in target for k in keep_fp32)
                    t = t.to(torch.float32 if fp32 else dtype)
                _set_tensor(model, target, t.to(device))
                loaded.add(target)
    if unexpected:
        warnings.warn(f"{len(unexpected)} checkpoint tensors were not used, e.g. {unexpected[:3]}", stacklevel=3)
    # buffers not in the checkpoint (rotary frequencies, ...) were built for real on the CPU
    for name, buf in list(model.named_buffers()):
        if name not in loaded and not buf.is_meta and buf.device != device:
            _set_tensor(model, name, buf.to(device))
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} dense tensors, e.g. {missing[:5]}")


__all__ = ["engine_of", "from_pretrained", "offload"]
