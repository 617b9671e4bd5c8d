"""One offloaded model's runtime: pinned expert pool, GPU slot cache and slot memory, routing
tables, the prefetcher, and statistics.

``offload`` / ``from_pretrained`` build it; each :class:`~sida_moe.experts.OffloadedExperts` calls
:meth:`OffloadEngine.run_layer`. Pool and cache keys are ``(MoE-layer ordinal, expert id)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from sida_moe import _native
from sida_moe.acquire_path import AcquirePath
from sida_moe.adapters.base import MoELayer
from sida_moe.budget import BudgetSpec, format_bytes, parse_budget, slots_for_budget
from sida_moe.experts import register_engine
from sida_moe.format import ExpertAddresses, ExpertFormat, SlotWeights, slot_views
from sida_moe.kernels import fused_experts_table, table_kernels_usable
from sida_moe.engine_observer import EngineObserver
from sida_moe.kernels.configs import DEFAULT_CROSSOVERS, device_crossovers
from sida_moe.prefetchers import NoPrefetch, Prefetcher
from sida_moe.routing_ring import RoutingRing

if TYPE_CHECKING:
    from sida_moe.serving_config import ServingConfig


def check_cache_options(policy: str, copy_workers: int) -> None:
    """The slot cache's policy and worker count, checked without a pool by the cache's own rules."""
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a str, got {type(policy).__name__}")
    if isinstance(copy_workers, bool) or not isinstance(copy_workers, int):
        raise TypeError(f"copy_workers must be an int, got {type(copy_workers).__name__}")
    _native.check_cache_options(policy, copy_workers)


BACKENDS = ("auto", "cuda", "host")


def check_backend(backend: str) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'cuda' or 'host', got {backend!r}")


class OffloadEngine:
    """Pool + cache + compute glue of one offloaded model (see the module docstring).

    Life cycle: construct (allocates the pool), :meth:`write_expert` every expert,
    :meth:`open_cache` (slot memory + SlotCache), :meth:`set_prefetcher`; then the model runs;
    :meth:`close` frees everything.
    """

    def __init__(self, layers: list[MoELayer], fmt: ExpertFormat, device: torch.device, backend: str = "auto") -> None:
        if not layers:
            raise ValueError("an OffloadEngine needs at least one MoE layer")
        device = torch.device(device)
        check_backend(backend)
        kind = ("cuda" if device.type == "cuda" else "host") if backend == "auto" else backend
        if kind == "cuda" and device.type != "cuda":
            raise ValueError(f"backend='cuda' needs the model on a CUDA device, but its experts are on {device}")
        if kind == "host" and device.type != "cpu":
            raise ValueError(f"backend='host' keeps slots in host memory: it needs the model on the CPU, not {device}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.layers = layers
        self.fmt = fmt
        self.device = device
        self.backend = _native.Backend(kind, device.index or 0) if kind == "cuda" else _native.Backend("host")
        keys = [(layer.ordinal, e) for layer in layers for e in range(layer.num_experts)]
        self.pool = _native.ExpertPool(self.backend, fmt.layout(), keys)
        self.num_experts_total = len(keys)
        self.max_experts = max(layer.num_experts for layer in layers)
        self.min_slots = max(layer.top_k for layer in layers)
        self.cache: _native.SlotCache | None = None
        # device ids (routing, predictions) to the cache, by a native thread; closed before the cache
        self.feed: _native.RoutingFeed | None = None
        self.slot_memory: torch.Tensor | None = None
        self.views: SlotWeights | None = None
        self._acquire_path: AcquirePath | None = None  # open_cache
        self.prefetcher: Prefetcher = NoPrefetch()
        self.generation = 0
        self.config: ServingConfig | None = None  # what it was built with (EngineBuilder)
        self.handle = register_engine(self)  # how the compiled model's custom op finds this engine
        self._counters = {"forwards": 0, "tokens": 0, "layer_calls": 0, "chunked_layer_calls": 0, "table_layer_calls": 0}
        self._skip_zero_weight = any(layer.adapter.routing_kind == "onehot" for layer in layers)
        self._hooks: list = []
        self._routed: list[int] | torch.Tensor = []  # the layer being run's experts (routed_experts)
        # decode through the expert table (open_cache): per-layer views of it, and the routing rows
        # of this forward's table visits, handed to the cache once the forward ends
        self.expert_table: torch.Tensor | None = None
        self._layer_tables: list[ExpertAddresses] = []
        self._ring = RoutingRing(len(layers), max(layer.top_k for layer in layers), device)  # this forward's table visits
        self._ahead_captured = None  # what the step being captured staged for the prefetcher (predict_ahead)
        # where the table path ends: the last streaming regime's reach on this device
        self._crossovers = device_crossovers(device.index) if device.type == "cuda" else DEFAULT_CROSSOVERS
        self._observers: tuple[EngineObserver, ...] = ()  # see observe(); none: nothing extra runs

    def add_observer(self, observer: EngineObserver) -> EngineObserver:
        """Let ``observer`` see this engine's layer calls from now on (``sida_moe.engine_observer``
        says what it is called with) until :meth:`remove_observer`; returns it. Observers nest:
        the last added sees each acquire first."""
        if not isinstance(observer, EngineObserver):
            raise TypeError(f"add_observer() takes a sida_moe.engine_observer.EngineObserver, got {type(observer).__name__}")
        if any(o is observer for o in self._observers):
            raise ValueError("this observer already observes the engine")
        self._observers = (*self._observers, observer)
        if self.cache is not None:
            observer.opened(self)
        return observer

    def remove_observer(self, observer: EngineObserver) -> None:
        if not any(o is observer for o in self._observers):
            raise ValueError("this observer does not observe the engine")
        self._observers = tuple(o for o in self._observers if o is not observer)
        observer.removed(self)

    @contextmanager
    def observe(self, observer: EngineObserver) -> Iterator[EngineObserver]:
        """:meth:`add_observer` for the block; yields the observer."""
        self.add_observer(observer)
        try:
            yield observer
        finally:
            self.remove_observer(observer)

    # ------------------------------------------------------------------ what prefetchers use
    @property
    def moe_layers(self) -> list[MoELayer]:
        return self.layers

    @property
    def routed_experts(self) -> list[int]:
        """Distinct experts of the MoE layer being run (during ``after_routing``). On the
        expert-table path this reads the routing back to the host when asked (a sync)."""
        if isinstance(self._routed, torch.Tensor):
            ids = self._routed
            self._routed = torch.unique(ids[ids >= 0]).tolist()
        return self._routed

    @property
    def num_slots(self) -> int:
        return self._require_cache().num_slots

    @property
    def expert_nbytes(self) -> int:
        return self.pool.expert_nbytes

    def prefetch(self, moe_layer: int, experts: list[int], priority: str = "prefetch", generation: int | None = None) -> int:
        """Queue loads of ``experts`` of ``moe_layer`` (returns how many were queued)."""
        return self._require_cache().prefetch(moe_layer, experts, priority, self.generation if generation is None else generation)

    def prefetch_deferred(
        self,
        ids: torch.Tensor,
        layers: list[int],
        priority: str = "prefetch",
        generation: int | None = None,
        future: bool = False,
        skip_routed: bool = False,
        remember: bool = False,
        forget: bool = False,
        feed_only: bool = False,
        after_next: bool = False,
    ) -> None:
        """Prefetch expert ids the device is still computing, without waiting for them:
        ``ids`` (int64, contiguous, ``[len(layers), ...]``: row i holds experts of MoE layer
        ``layers[i]``) on the engine's device, written on the current stream. The copy to the host
        and an event are queued on that stream; a native thread does the rest (see
        ``RoutingFeed.submit_predicted``). ``ids`` must not be written by another stream until then:
        a static buffer rewritten only on this stream, or a tensor kept alive meanwhile.
        ``feed_only``: the rows feed the policy (``future``) and the scores (``remember``) only;
        ``after_next``: they are the step after the next one (``RoutingFeed.submit_predicted``)."""
        cache = self._require_cache()
        if ids.dtype != torch.int64 or not ids.is_contiguous():
            raise ValueError(f"ids must be a contiguous int64 tensor, got {ids.dtype}"
                             f"{'' if ids.is_contiguous() else ' (not contiguous)'}")
        on_cuda = cache.backend_kind == "cuda"
        index = self.device.index if self.device.index is not None else (torch.cuda.current_device() if on_cuda else None)
        if (ids.device.type == "cuda") != on_cuda or (on_cuda and ids.device.index != index):
            raise ValueError(f"ids must be on the engine's device ({self.device}), got {ids.device}")
        if ids.numel() == 0 or ids.numel() % len(layers):
            raise ValueError(f"ids must hold a whole row per layer ({len(layers)} layers), got {ids.numel()} ids")
        stream = torch.cuda.current_stream(ids.device).cuda_stream if on_cuda else None
        self.feed.submit_predicted(ids.data_ptr(), layers, ids.numel() // len(layers), stream,
                                   generation=self.generation if generation is None else generation, priority=priority,
                                   future=future, skip_routed=skip_routed, remember=remember, forget=forget,
                                   feed_only=feed_only, after_next=after_next)

    def wait_deferred(self, timeout: float | None = None) -> bool:
        """Wait until every ``prefetch_deferred`` so far was handled (False on timeout)."""
        return self.feed.wait(timeout) if self.feed is not None else True

    def cancel_before(self, generation: int) -> None:
        self._require_cache().cancel_before(generation)

    def set_future(self, visits: list[tuple[int, list[int]]], offset: int = 0) -> None:
        """Feed the predictive policy: expected experts of the next acquire calls (one per MoE layer
        call, in call order)."""
        self._require_cache().set_future(visits, offset)

    # ------------------------------------------------------------------------------ building
    def write_expert(self, moe_layer: int, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        """Copy one expert's canonical tensors into the pinned pool."""
        self.fmt.check_tensors(tensors, f"expert ({moe_layer}, {expert})")
        for name in self.fmt.tensor_shapes():
            t = tensors[name].detach().to("cpu").contiguous()
            self.pool.write_ptr(moe_layer, expert, name, t.data_ptr(), t.numel() * t.element_size())

    def slots_for(self, gpu_budget: BudgetSpec) -> int:
        """Slot count of ``gpu_budget`` (BudgetError below one layer's top-k)."""
        total = self.num_experts_total * self.pool.expert_nbytes
        return slots_for_budget(parse_budget(gpu_budget, total), self.pool.expert_nbytes, self.num_experts_total, self.min_slots)

    def open_cache(self, num_slots: int, policy: str = "lru", copy_workers: int = 2) -> None:
        """Allocate the slot memory on the model's device and start the slot cache."""
        if self.cache is not None:
            raise RuntimeError("the cache is already open")
        self.check_cache_args(num_slots, policy, copy_workers)  # before the slot memory is allocated
        nbytes = self.pool.expert_nbytes
        self.slot_memory = torch.empty((num_slots, nbytes), dtype=torch.uint8, device=self.device)
        self.cache = _native.SlotCache(self.pool, num_slots, policy, slots_ptr=self.slot_memory.data_ptr(), copy_workers=copy_workers)
        self.feed = _native.RoutingFeed(self.cache)
        for observer in self._observers:
            observer.opened(self)
        self.views = slot_views(self.slot_memory, self.fmt, self.pool.tensor_offsets)
        self._attach_expert_table()
        self._acquire_path = AcquirePath(self.cache, self.views, self.fmt, [layer.num_experts for layer in self.layers],
                                         self.device)

    def check_cache_args(self, num_slots: int, policy: str, copy_workers: int) -> None:
        """Raise for arguments ``open_cache`` would refuse, before anything is allocated or closed."""
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or not 1 <= num_slots <= self.num_experts_total:
            raise _native.BudgetError(f"num_slots must be an int in 1..={self.num_experts_total} (one slot per expert "
                                      f"at most), got {num_slots!r}")
        check_cache_options(policy, copy_workers)

    def _attach_expert_table(self) -> None:
        """Give the cache the expert table that decode layers read weights through (where the
        streaming kernels can run: always on the host backend, with CuPy on CUDA)."""
        if not table_kernels_usable(self.device, self.fmt):
            return
        # a reopened cache keeps the table's memory (captured decode steps hold its address); the
        # new cache points every entry back at the pool before any slot is filled
        table = self.expert_table
        if table is None:
            with torch.inference_mode(False):
                table = torch.zeros(self.num_experts_total, dtype=torch.int64, device=self.device)
        self.cache.attach_expert_table(table.data_ptr(), self._stream())
        if self.expert_table is not None:
            return
        self.expert_table = table
        offsets, nbytes, start = self.pool.tensor_offsets, self.pool.expert_nbytes, 0
        for layer in self.layers:  # pool keys are layer-major, as built in __init__
            self._layer_tables.append(ExpertAddresses(table[start : start + layer.num_experts], offsets, nbytes))
            start += layer.num_experts

    def reopen_cache(self, num_slots: int, policy: str | None = None, copy_workers: int = 2) -> None:
        """Replace the slot cache (new size / policy, empty slots; ``slots_for(budget)`` gives the
        size); the pinned pool is kept and the old slot memory is freed first."""
        policy = policy or (self.cache.policy if self.cache is not None else "lru")
        self.check_cache_args(num_slots, policy, copy_workers)  # the old cache stays open on bad ones
        self.close_cache()
        self.open_cache(num_slots, policy, copy_workers)
        self.prefetcher.attach(self)

    def close_cache(self) -> None:
        """Stop the routing feed and the slot cache and free the slot memory; the pool stays
        (``reopen_cache``, or an ``offload`` that fails and writes the original weights back)."""
        self._close_cache()
        self.feed = self.cache = None
        self._acquire_path = None
        self.slot_memory = None
        self.views = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def keep_hook(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        """A model hook serving this engine, removed when it closes."""
        self._hooks.append(handle)

    def set_prefetcher(self, prefetcher: Prefetcher) -> None:
        old, self.prefetcher = self.prefetcher, prefetcher
        old.close()
        prefetcher.attach(self)

    # ----------------------------------------------------------------------------- running
    def begin_forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Called by the model hooks once per stack forward, before any layer runs."""
        self.end_forward()  # a forward whose end hook did not run (it raised)
        self.read_table_here()
        self.generation += 1
        self._counters["forwards"] += 1
        self._counters["tokens"] += int(inputs_embeds.shape[0] * inputs_embeds.shape[1]) if inputs_embeds.dim() == 3 else int(inputs_embeds.shape[0])
        if self.cache is not None:
            self.cache.cancel_before(self.generation)
        self.prefetcher.begin_forward(inputs_embeds, attention_mask)

    def end_forward(self) -> None:
        """Hand this forward's table visits (layers and their routed ids) to the cache: a native
        thread counts hits and misses, updates the policy and loads the misses, without the
        inference thread waiting. Called by the model hooks after each stack forward, and after
        each replay of a captured decode step."""
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return  # a captured step: its visits are handed over after each replay
        if not self._ring.visits or self.cache is None:
            self._ring.take()
            return
        rows = self._ring.pending_rows()
        visits, width = self._ring.take()
        self.feed.submit_routed(rows.data_ptr(), visits, width, self._stream())

    def read_table_here(self) -> None:
        """Table reads are queued on the current stream from now on: the cache fences evictions
        there, after what the stream that read before had queued (``switch_reader_stream``).
        Called before reads on a stream (each eager forward, each run of replays); nothing inside
        a capture (its replays read where they are launched) or without an expert table."""
        if self.device.type != "cuda" or self.cache is None or self.expert_table is None:
            return
        if not torch.cuda.is_current_stream_capturing():
            self.cache.switch_reader_stream(self._stream())

    def take_captured_visits(self) -> tuple[list[int], int, object | None]:
        """What a decode step captured (it ran nothing yet): its table visits, their row width,
        and what its prediction of the next step (``predict_ahead``) staged into (None: none),
        which the step's owner keeps as long as the step and hands back at each replay."""
        visits, width = self._ring.take()
        ahead, self._ahead_captured = self._ahead_captured, None
        return visits, width, ahead

    def end_replayed_forward(self, visits: list[int], width: int, ahead: object | None = None) -> None:
        """``end_forward`` for one replay of a captured step that made ``visits``; then the
        next step's prediction it staged into ``ahead``, if any."""
        self._ring.restore(visits, width)
        self.end_forward()
        if ahead is not None:
            self.prefetcher.hand_over_ahead(replayed=True, staged=ahead)

    def begin_sequence(self, batch: int, length: int, static_mask: bool = False) -> None:
        """A decode loop starts a new sequence of ``batch`` rows and at most ``length`` tokens
        (the prefetcher sizes its per-sequence state by it); ``static_mask``: its forwards take
        one attention mask of ``length`` columns."""
        begin = getattr(self.prefetcher, "begin_sequence", None)
        if begin is not None:
            begin(batch, length, static_mask=static_mask)

    def predict_ahead(self, next_embeds: torch.Tensor, compiled: bool = False) -> None:
        """End of a decode step whose next input is known (the greedy loop): a prefetcher that
        predicts from the token (``predict_ahead``) predicts the next step now, so the cache loads
        its experts while that step runs. Inside a captured step the prediction is staged, its
        own step captured after the decode step's (``capture_ahead``), launched and handed over
        after each replay (``end_replayed_forward``). ``compiled``: the decode step is compiled,
        and so may the prediction be."""
        predict = getattr(self.prefetcher, "predict_ahead", None)
        made = None if predict is None else predict(next_embeds, compiled=compiled)
        if not made:
            return
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            self._ahead_captured = made  # where the step staged the prediction's inputs
        else:
            self.prefetcher.hand_over_ahead(replayed=False)

    def capture_ahead(self, staged: object) -> None:
        """After capturing a decode step whose prediction of the next one staged into ``staged``
        (``take_captured_visits``): capture the prefetcher's prediction step, which each
        replay's hand-over launches."""
        self.prefetcher.capture_ahead(staged)

    def quiesce(self) -> None:
        """Let every queued copy and routing hand-over finish (before capturing a graph, which no
        other thread may disturb)."""
        cache = self._require_cache()
        self.feed.wait(None)
        cache.synchronize()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def uses_table(self, moe_layer: int, num_tokens: int) -> bool:
        """Whether a layer call of ``num_tokens`` tokens computes through the expert table (the
        decode path: few pairs per expert, the streaming kernels' regimes) rather than acquiring
        slots (prefill)."""
        if not self._layer_tables:
            return False
        layer = self.layers[moe_layer]
        return num_tokens * layer.top_k <= self._crossovers.mma_max_pairs_per_expert * layer.num_experts

    def _run_table(self, moe_layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Decode path: compute from wherever each expert is (slot or pinned pool), no acquire,
        no host sync on CUDA; the visit reaches the cache when the forward ends."""
        ids = torch.where(topk_weights != 0, topk_ids, -1) if self._skip_zero_weight else topk_ids
        table = self._layer_tables[moe_layer]
        if not self._ring.fits(ids.shape[0]):
            self.end_forward()  # a forward of another shape (encoder vs decoder): hand it over first
        self._ring.record(moe_layer, ids, table.base, clamp=self._skip_zero_weight)
        self._routed = ids
        for observer in self._observers:
            observer.table_visit(self, moe_layer, ids)
        if self.device.type == "cuda":
            out = fused_experts_table(x, ids, topk_weights, table, self.fmt)
        else:
            # slots may be refilled by copy threads meanwhile: the cache waits for this read
            # before overwriting a slot it has pointed elsewhere
            ticket = self.cache.begin_table_read()
            try:
                out = fused_experts_table(x, ids, topk_weights, table, self.fmt)
            finally:
                self.cache.end_table_read(ticket)
        if not (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            self.prefetcher.after_routing(moe_layer, x, topk_ids)
        return out

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def run_layer(self, moe_layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """The experts of one MoE layer for ``hidden [T, H]``: acquire the routed experts' slots (in
        chunks of at most ``num_slots`` distinct experts), compute, release."""
        cache = self._require_cache()
        topk_ids, topk_weights = self.prefetcher.route(moe_layer, hidden, topk_ids, topk_weights)
        x = hidden if hidden.dtype == self.fmt.dtype else hidden.to(self.fmt.dtype)
        self._counters["layer_calls"] += 1
        if self.uses_table(moe_layer, x.shape[0]):
            self._counters["table_layer_calls"] += 1
            out = self._run_table(moe_layer, x, topk_ids, topk_weights)
            return out if out.dtype == hidden.dtype else out.to(hidden.dtype)
        used = topk_ids[topk_weights != 0] if self._skip_zero_weight else topk_ids
        distinct = torch.unique(used).tolist()  # prefill's one host sync per layer: acquire needs ids
        self._routed = distinct
        if len(distinct) > cache.num_slots:
            self._counters["chunked_layer_calls"] += 1
        out = self._acquire_path.run(moe_layer, distinct, x, topk_ids, topk_weights, self._stream(), self._observers,
                                     self, lambda: self.prefetcher.after_routing(moe_layer, x, topk_ids))
        return out if out.dtype == hidden.dtype else out.to(hidden.dtype)

    # ------------------------------------------------------------------------------- stats
    def stats(self) -> dict[str, float | str]:
        """Cache counters (hits, misses, bytes_copied, stream_waits, ...), hit_rate, prefetcher
        metrics (``prefetch_<name>``), engine counters and memory figures; with
        what each observer adds (:meth:`observe`)."""
        cache = self._require_cache()
        self.feed.wait(10.0)  # decode visits still on their way to the cache's counters
        out: dict[str, float | str] = {**cache.stats(), **self.feed.stats()}
        lookups = out.get("hits", 0) + out.get("misses", 0)
        out["hit_rate"] = out.get("hits", 0) / lookups if lookups else 0.0
        out.update({k: float(v) for k, v in self._counters.items()})
        for observer in self._observers:
            out.update(observer.stats(self))
        out["prefetcher"] = self.prefetcher.name
        metrics = getattr(self.prefetcher, "metrics", None)
        if callable(metrics):
            out.update({f"prefetch_{k}": float(v) for k, v in metrics().items()})
        out["num_slots"] = float(cache.num_slots)
        out["slot_bytes"] = float(cache.num_slots * self.pool.expert_nbytes)
        out["all_experts_bytes"] = float(self.num_experts_total * self.pool.expert_nbytes)
        out["pool_bytes"] = float(self.pool.allocated_bytes)
        return out

    def reset_stats(self) -> None:
        self._require_cache()
        self.feed.wait(10.0)
        self.cache.reset_stats()
        self.feed.reset_stats()
        self._counters = dict.fromkeys(self._counters, 0)
        for observer in self._observers:
            observer.reset(self)
        reset = getattr(self.prefetcher, "reset_metrics", None)
        if callable(reset):
            reset()

    def describe(self) -> str:
        cache = self._require_cache()
        pool = "pinned pool" if cache.backend_kind == "cuda" else "host pool"  # pinned only for CUDA
        return (
            f"{len(self.layers)} MoE layers, {self.num_experts_total} experts of {format_bytes(self.pool.expert_nbytes)} "
            f"in a {format_bytes(self.pool.allocated_bytes)} {pool}; {cache.num_slots} slots "
            f"({format_bytes(cache.num_slots * self.pool.expert_nbytes)}) on {self.device}, policy {cache.policy}, "
            f"prefetch {self.prefetcher.name}"
        )

    # ----------------------------------------------------------------------------- closing
    def close(self) -> None:
        """Stop the prefetcher and copy workers and free slots and pool. Idempotent; the model
        cannot run afterwards."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.prefetcher.close()
        self._close_cache()
        self.pool.close()
        self.slot_memory = None
        self.views = None

    def _close_cache(self) -> None:
        """The feed first: its thread hands what was submitted to the cache."""
        if self.feed is not None:
            self.feed.close()
        if self.cache is not None:
            self.cache.close()

    def _require_cache(self) -> _native.SlotCache:
        if self.cache is None:
            raise RuntimeError("the engine's cache is not open yet (call open_cache)")
        return self.cache
