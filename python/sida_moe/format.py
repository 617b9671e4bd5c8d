"""The canonical in-slot layout of one expert, shared by adapters, the cache and the kernels.

Every supported architecture is converted to this one layout when its weights enter the pinned
pool, so that the kernels and the reference path handle a single format:

- ``gate_up``: ``[2*I, H]`` for gated experts (rows ``0..I`` are the gate projection, rows ``I..2I``
  the up projection) or ``[I, H]`` for plain MLP experts (Switch Transformers ``wi``).
- ``down``: ``[H, I]``.
- ``gate_up_bias``: ``[2*I]`` or ``[I]`` and ``down_bias``: ``[H]`` when ``has_bias`` (GPT-OSS).

An expert computes ``down @ act(gate_up @ x + b1) + b2`` where for gated experts
``act(z) = act_fn(z[:I]) * z[I:]`` (GPT-OSS: clamped SwiGLU with ``alpha`` and ``limit``), and a
layer's output for token t is ``sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x_t)``.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Literal

import torch

Activation = Literal["silu", "gelu", "gelu_tanh", "relu", "gpt_oss"]

_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "gpt_oss")


@dataclass(frozen=True)
class ExpertFormat:
    """Shape, dtype and activation of the experts of one shape class."""

    hidden: int
    intermediate: int
    dtype: torch.dtype
    gated: bool = True
    activation: Activation = "silu"
    has_bias: bool = False
    # GPT-OSS clamped SwiGLU: glu = gate * sigmoid(alpha * gate), gate <= limit, -limit <= up <= limit
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if self.hidden <= 0 or self.intermediate <= 0:
            raise ValueError(f"hidden and intermediate must be positive, got {self.hidden}, {self.intermediate}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if self.activation == "gpt_oss" and not self.gated:
            raise ValueError("the gpt_oss activation is a gated (SwiGLU) activation")

    @property
    def gate_up_rows(self) -> int:
        return 2 * self.intermediate if self.gated else self.intermediate

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Named tensors of one expert, in record order."""
        shapes: dict[str, tuple[int, ...]] = {
            "gate_up": (self.gate_up_rows, self.hidden),
            "down": (self.hidden, self.intermediate),
        }
        if self.has_bias:
            shapes["gate_up_bias"] = (self.gate_up_rows,)
            shapes["down_bias"] = (self.hidden,)
        return shapes

    def check_tensors(self, tensors: dict[str, torch.Tensor], what: str) -> None:
        """ValueError unless ``tensors`` are exactly this format's canonical tensors of ``what``
        (an expert), with their shapes and dtype."""
        shapes = self.tensor_shapes()
        if set(tensors) != set(shapes):
            raise ValueError(f"{what}: tensors must be exactly {sorted(shapes)}, got {sorted(tensors)}")
        for name, shape in shapes.items():
            t = tensors[name]
            if tuple(t.shape) != shape or t.dtype != self.dtype:
                raise ValueError(f"{what} tensor {name!r}: expected {shape} {self.dtype}, got {tuple(t.shape)} {t.dtype}")

    def layout(self) -> list[tuple[str, int]]:
        """``ExpertPool`` layout: (tensor name, byte size) in record order."""
        out = []
        for name, shape in self.tensor_shapes().items():
            n = 1
            for d in shape:
                n *= d
            out.append((name, n * self.itemsize))
        return out


@dataclass(frozen=True)
class ExpertTensors:
    """One expert's tensors in the canonical layout (views of its record's bytes)."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None


@dataclass(frozen=True)
class ExpertAddresses:
    """Where the streaming kernels find experts: ``base[i]`` is the address of record ``i`` (a
    slot, or an expert-table entry: a slot or the expert's pinned pool record); each tensor sits at
    a fixed byte ``offsets[name]`` inside a record of ``record_nbytes``."""

    base: torch.Tensor  # int64 [N], on the device the kernels run on
    offsets: dict[str, int]
    record_nbytes: int
    _views: dict[int, ExpertTensors] = field(default_factory=dict, compare=False, repr=False)

    def offset(self, name: str) -> int:
        """Byte offset of ``name`` in a record, -1 when the format has no such tensor."""
        return self.offsets.get(name, -1)

    def tensors_at(self, addr: int, fmt: ExpertFormat) -> ExpertTensors:
        """Typed views of the record at host address ``addr`` (host backend: slots and pool are
        host memory). Cached: records never move while their cache is open."""
        got = self._views.get(addr)
        if got is None:
            raw = torch.frombuffer((ctypes.c_uint8 * self.record_nbytes).from_address(addr), dtype=torch.uint8)
            shapes = fmt.tensor_shapes()

            def view(name: str) -> torch.Tensor:
                n = 1
                for d in shapes[name]:
                    n *= d
                off = self.offsets[name]
                return raw[off : off + n * fmt.itemsize].view(fmt.dtype).view(shapes[name])

            got = ExpertTensors(
                gate_up=view("gate_up"),
                down=view("down"),
                gate_up_bias=view("gate_up_bias") if fmt.has_bias else None,
                down_bias=view("down_bias") if fmt.has_bias else None,
            )
            self._views[addr] = got
        return got


@dataclass(frozen=True)
class SlotWeights:
    """Typed strided views of every slot's tensors: ``gate_up[s]`` is slot s's gate_up matrix;
    ``addresses`` the same slots as record addresses (what the streaming kernels take)."""

    gate_up: torch.Tensor  # [S, gate_up_rows, H]
    down: torch.Tensor  # [S, H, I]
    gate_up_bias: torch.Tensor | None  # [S, gate_up_rows]
    down_bias: torch.Tensor | None  # [S, H]
    addresses: ExpertAddresses | None = None

    @property
    def num_slots(self) -> int:
        return self.gate_up.shape[0]


def slot_views(slot_buffer: torch.Tensor, fmt: ExpertFormat, offsets: dict[str, int]) -> SlotWeights:
    """Views into a ``[num_slots, slot_nbytes]`` uint8 tensor (the cache's slot memory).

    ``offsets`` is ``ExpertPool.tensor_offsets``. No copy: the views alias the slot memory, so they
    see whatever the cache last loaded into each slot.
    """
    if slot_buffer.dtype != torch.uint8 or slot_buffer.dim() != 2:
        raise ValueError(f"slot_buffer must be a 2-D uint8 tensor, got {slot_buffer.dtype} {tuple(slot_buffer.shape)}")
    num_slots, slot_nbytes = slot_buffer.shape
    item = fmt.itemsize
    if slot_nbytes % item:
        raise ValueError(f"slot size {slot_nbytes} is not a multiple of the dtype size {item}")
    typed = slot_buffer.view(fmt.dtype)  # [S, slot_nbytes // item]
    stride = slot_nbytes // item

    def view(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        off = offsets[name]
        if off % item:
            raise ValueError(f"tensor {name!r} offset {off} is not aligned to {item} bytes")
        inner = []
        acc = 1
        for d in reversed(shape):
            inner.append(acc)
            acc *= d
        return typed.as_strided((num_slots, *shape), (stride, *reversed(inner)), typed.storage_offset() + off // item)

    shapes = fmt.tensor_shapes()
    base = slot_buffer.data_ptr() + torch.arange(num_slots, dtype=torch.int64) * slot_nbytes
    return SlotWeights(
        gate_up=view("gate_up", shapes["gate_up"]),
        down=view("down", shapes["down"]),
        gate_up_bias=view("gate_up_bias", shapes["gate_up_bias"]) if fmt.has_bias else None,
        down_bias=view("down_bias", shapes["down_bias"]) if fmt.has_bias else None,
        addresses=ExpertAddresses(base.to(slot_buffer.device), dict(offsets), slot_nbytes),
    )
