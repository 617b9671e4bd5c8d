"""Type stubs for ``sida_moe._native``, the Rust runtime (pinned pools, slot cache, prefetch queue).

Keys: an expert is named by ``(layer, expert)``; ``layer`` is the index the caller gave when it
declared the pool (any non-negative int, typically the MoE-layer ordinal), ``expert`` the expert id.
All byte counts are Python ints. Every call that can block or copy releases the GIL.
Arguments typed ``Sequence[int]`` (experts, slots) also accept numpy arrays and torch tensors
(anything with ``tolist()``; a CUDA tensor's ``tolist()`` synchronizes its stream); a str, a
single int or non-integer items raise TypeError.
"""

from collections.abc import Sequence
from typing import Literal, final

import torch
from typing_extensions import Buffer

__version__: str
MAX_COPY_WORKERS: int
"""Most copy worker threads a SlotCache starts (``copy_workers`` is in ``0..=MAX_COPY_WORKERS``)."""

# ----------------------------------------------------------------------------------- exceptions
class SidaMoeError(Exception):
    """Base class of every error raised by the runtime."""

class BudgetError(SidaMoeError, ValueError):
    """A budget / slot count is invalid (zero, negative, or too small for the request)."""

class UnknownExpertError(SidaMoeError, KeyError):
    """A (layer, expert) or tensor name that the pool does not hold."""

class SlotStateError(SidaMoeError, RuntimeError):
    """A slot operation that its state forbids (double release, release of a slot not acquired)."""

class ClosedError(SidaMoeError, RuntimeError):
    """The object was closed (or its pool / cache was); it cannot be used any more."""

class CudaError(SidaMoeError, RuntimeError):
    """A CUDA driver call failed, or CUDA was requested on a machine that has none."""

class InvalidArgumentError(SidaMoeError, ValueError):
    """A malformed argument: negative id/size/offset, a buffer of the wrong size, a slot index out
    of range, an unknown policy / priority / backend name."""

class LoadError(SidaMoeError, OSError):
    """Reading a weights or trace file failed, or the file is malformed (the message names the file)."""

class OutOfMemoryError(SidaMoeError, MemoryError):
    """An allocation of a legal size failed: not enough host (or pinned) memory for the request."""

# ------------------------------------------------------------------------------------- backend
@final
class Backend:
    """Where slots live and how bytes reach them.

    ``kind="cuda"``: CUDA driver API loaded at run time (``libcuda.so.1``); uses the device's primary
    context, so it shares memory and streams with PyTorch. ``kind="host"``: slots are host memory and
    copies are ``memcpy`` (CPU-only machines, CI). ``kind="auto"``: CUDA when a driver and a device are
    present, else host.
    """

    def __init__(self, kind: Literal["auto", "cuda", "host"] = "auto", device: int = 0) -> None: ...
    @property
    def kind(self) -> Literal["cuda", "host"]: ...
    @property
    def device(self) -> int: ...
    @staticmethod
    def cuda_available() -> bool:
        """True when libcuda loads and reports at least one device; never raises."""

# ---------------------------------------------------------------------------------- expert pool
@final
class ExpertPool:
    """Page-locked host storage for every expert of one shape class.

    ``layout`` lists the named tensors of one expert with their byte sizes, e.g.
    ``[("gate_up", 2*I*H*2), ("down", H*I*2)]``. Each tensor starts 256-byte aligned inside an
    expert record; ``expert_nbytes`` is the padded record size. Records are packed into arenas of
    exactly the size they need (at most ``arena_bytes`` each, no power-of-two rounding), so
    ``allocated_bytes == len(keys) * expert_nbytes``. Memory is pinned (cuMemHostAlloc) on the CUDA
    backend and page-aligned anonymous mappings (returned to the OS on close) on the host backend. Freshly allocated memory is zeroed.
    """

    def __init__(
        self,
        backend: Backend,
        layout: Sequence[tuple[str, int]],
        keys: Sequence[tuple[int, int]],
        arena_bytes: int = 1 << 30,
    ) -> None: ...
    @property
    def expert_nbytes(self) -> int: ...
    @property
    def tensor_offsets(self) -> dict[str, int]:
        """Byte offset of each named tensor inside an expert record (same in a cache slot)."""
    @property
    def tensor_nbytes(self) -> dict[str, int]: ...
    @property
    def num_experts(self) -> int: ...
    @property
    def num_arenas(self) -> int: ...
    @property
    def allocated_bytes(self) -> int: ...
    @property
    def keys(self) -> list[tuple[int, int]]: ...
    def contains(self, layer: int, expert: int) -> bool: ...
    def write(self, layer: int, expert: int, tensor: str, data: Buffer | torch.Tensor) -> None:
        """Copy ``data`` (bytes, a contiguous CPU torch tensor of any dtype, or any C-contiguous
        buffer: numpy array, memoryview) into the named tensor. Its byte size must equal the
        tensor's (else InvalidArgumentError); the dtype is not checked."""
    def write_ptr(self, layer: int, expert: int, tensor: str, ptr: int, nbytes: int) -> None:
        """Same as ``write`` from a raw host address (e.g. ``cpu_tensor.data_ptr()``); the caller
        guarantees ``nbytes`` readable bytes at ``ptr``."""
    def read(self, layer: int, expert: int, tensor: str | None = None) -> bytes:
        """Copy of the named tensor's bytes (or of the whole record when ``tensor`` is None)."""
    def host_ptr(self, layer: int, expert: int) -> int:
        """Address of the expert's record in pinned memory (valid until ``close``)."""
    def load_safetensors(
        self,
        path: str,
        entries: Sequence[tuple[str, int, int, str, int, int, int]],
    ) -> int:
        """Stream bytes from a safetensors file straight into the pool (one read into pinned
        memory, never a second copy in RAM). Each entry is ``(file_tensor_name, layer, expert,
        tensor, src_offset, nbytes, dst_offset)``: copy ``nbytes`` bytes starting ``src_offset``
        bytes into the file tensor's data to ``dst_offset`` bytes into the pool tensor. Returns the
        number of bytes read. Errors name the file, tensor and entry that failed."""
    def close(self) -> None:
        """Free the arenas. A no-op when already closed; raises SlotStateError while an open
        SlotCache still uses the pool (the pool's memory is also freed when it is garbage
        collected and no cache holds it)."""
    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> ExpertPool: ...
    def __exit__(self, *exc: object) -> None: ...

# ----------------------------------------------------------------------------------- slot cache
Policy = Literal["lru", "lfu", "fifo", "predictive"]
Priority = Literal["demand", "prefetch"]

@final
class SlotCache:
    """A budgeted set of device slots, each holding one expert record of ``pool``.

    Slot states: free -> loading -> ready, with a refcount of readers; a slot being loaded or read
    (refcount > 0) is never evicted. ``slots_ptr`` hands in caller-owned memory of at least
    ``num_slots * slot_nbytes`` bytes (e.g. a torch uint8 tensor's ``data_ptr()``; device memory on
    the CUDA backend, host memory on the host backend); when None the cache allocates it.

    Copies: speculative and demand prefetches go through a lock-free bounded queue with two lanes
    (demand first) served by ``copy_workers`` threads that issue async host-to-device copies on
    one shared normal-priority copy stream and record a per-slot ready event. ``acquire`` loads
    misses itself on a high-priority demand stream. Before a slot is overwritten, the copy stream
    waits on the slot's done-reading events recorded by ``release`` (one per releasing stream)
    and on the slot's previous ready event. Copy streams are non-blocking: they never serialize
    with the legacy default stream. Closing (or garbage-collecting) the cache joins the workers.
    """

    def __init__(
        self,
        pool: ExpertPool,
        num_slots: int,
        policy: Policy = "lru",
        slots_ptr: int | None = None,
        copy_workers: int = 2,
        queue_capacity: int = 4096,
        acquire_timeout: float = 60.0,
    ) -> None:
        """``num_slots`` in ``1..=pool.num_experts`` (else BudgetError). ``copy_workers`` in
        ``0..=MAX_COPY_WORKERS`` (64): with 0, queued prefetches are served by ``synchronize`` in the
        calling thread (deterministic tests). ``queue_capacity`` is per lane, in ``1..=2**20``.
        Out-of-range values raise before anything is allocated; OutOfMemoryError when the slot
        memory or tables of a legal size cannot be allocated. ``acquire`` raises BudgetError when, for
        ``acquire_timeout`` seconds, other pins leave too few evictable slots."""
    @property
    def num_slots(self) -> int: ...
    @property
    def slot_nbytes(self) -> int:
        """Equals ``pool.expert_nbytes``; slot ``i`` starts at ``slots_ptr + i * slot_nbytes``."""
    @property
    def slots_ptr(self) -> int: ...
    @property
    def policy(self) -> Policy: ...
    @property
    def backend_kind(self) -> Literal["cuda", "host"]: ...
    def acquire(self, layer: int, experts: Sequence[int], stream: int = 0) -> list[int]:
        """Pin the given experts of ``layer`` in slots and return their slot indices (same order,
        duplicates allowed). Misses are loaded now. On CUDA, ``stream`` (a CUstream handle, e.g.
        ``torch.cuda.current_stream().cuda_stream``) is made to wait on each slot's ready event: the
        host does not block on copies in flight. Raises BudgetError when the distinct experts
        exceed ``num_slots``, UnknownExpertError for an expert the pool lacks. All-or-nothing: on
        error nothing stays pinned. When other threads pin too many slots it waits for releases.
        Hits/misses count distinct experts; an expert still being prefetched is a hit."""
    def release(self, slots: Sequence[int], stream: int = 0) -> None:
        """Unpin slots returned by ``acquire`` (one release per acquired entry). Records the
        done-reading event on ``stream``. Raises SlotStateError on a slot that is not pinned (and
        InvalidArgumentError on one out of range); all-or-nothing: then nothing is released."""
    def prefetch(
        self,
        layer: int,
        experts: Sequence[int],
        priority: Priority = "prefetch",
        generation: int = 0,
    ) -> int:
        """Queue loads of experts not yet resident; returns how many were queued (a full queue
        drops the rest, counted in stats). Requests with ``generation`` below the last
        ``cancel_before`` are discarded by the workers (counted as cancelled)."""
    def attach_expert_table(self, table_ptr: int, stream: int | None = None) -> None:
        """Attach the expert table the decode kernels read weights through: ``table_ptr`` is a
        contiguous int64 tensor of one entry per pool key (pool key order) on the cache's device
        (host memory on the host backend), kept alive and written by no one else until ``close``.
        Every entry is set to its expert's pool record (a pinned address the GPU reads in place);
        from then on the cache points an entry at a slot once a copy into it has landed (written on
        the copy's stream after it) and back at the pool before that slot is overwritten (written
        on the reader stream ``stream``, which decode steps run on; the copy waits for it). Only
        before any slot is filled, once. Raises ValueError on a null pointer or a second attach."""
    @property
    def reader_stream(self) -> int:
        """The stream table reads are queued on (ValueError without an expert table)."""
    def switch_reader_stream(self, stream: int) -> bool:
        """Table reads are queued on ``stream`` from now on (see ``attach_expert_table``): if it is
        another stream, it first waits for the old reader stream's queued work, so evictions
        fenced on it also follow those reads; evictions never straddle a switch. Returns whether
        the stream changed."""
    def begin_table_read(self) -> int:
        """Host backend: a decode layer starts reading through the table; returns a ticket. A
        slot pointed elsewhere is not overwritten until every read begun before that ended."""
    def end_table_read(self, ticket: int) -> None:
        """End the read ``ticket`` (ValueError if it is not in progress)."""
    def note_routed(self, layer: int, experts: Sequence[int]) -> int:
        """A layer computed ``experts`` through the table: count hits and misses (by residency),
        update the policy, queue loads of the experts not resident (never cancelled). Returns the
        loads queued."""
    def cancel_before(self, generation: int) -> None:
        """Cancel every queued prefetch whose generation is below ``generation``."""
    def set_future(self, visits: Sequence[tuple[int, Sequence[int]]], offset: int = 0) -> None:
        """Predictive policy feed. ``visits[i] = (layer, experts)`` is the expected content of the
        acquire call number ``now + offset + i`` (``now`` = acquires so far). The predictive policy
        evicts the resident expert whose next expected use is furthest (never-predicted first).
        Given the true future it is Belady's optimal policy."""
    def resident(self) -> dict[tuple[int, int], int]:
        """Map of resident (loading or ready) experts to their slots."""
    def lookup(self, layer: int, expert: int) -> int | None: ...
    def slot_states(self) -> list[tuple[str, int, tuple[int, int] | None]]:
        """Per slot: (state in "free" | "loading" | "ready", refcount, key)."""
    def read_slot(self, slot: int) -> bytes:
        """Copy of a slot's bytes back to the host (synchronizes; for tests and debugging)."""
    def synchronize(self) -> None:
        """Wait until every queued prefetch is issued and every copy has landed."""
    def stats(self) -> dict[str, float]:
        """Counters: hits, misses, prefetch_issued, prefetch_used, prefetch_wasted,
        prefetch_cancelled, prefetch_dropped, evictions, bytes_copied, copy_seconds,
        host_stall_seconds, achieved_gbps, acquires, releases; also prefetch_queued,
        prefetch_redundant (already resident when a worker got to it), prefetch_queue_full (the
        part of prefetch_dropped refused by a full queue; the rest found no evictable slot), demand_loads, load_errors,
        queue_len, num_slots. On CUDA ``copy_seconds`` sums per-copy times measured by timing
        events on the copy streams (``achieved_gbps`` = timed bytes / that time); on the host it is
        the memcpy wall time. ``host_stall_seconds``: time acquire spent in calls that had to load
        or wait. ``stream_waits``: acquires timed while a ``StreamWaitProbe`` was open (see there). Table
        visits (``note_routed``, and a ``RoutingFeed``'s ``submit_routed``): ``routed_visits``, ``routed_misses`` (experts read
        in place from the pool), ``routed_declined`` (misses not admitted, so not copied),
        ``routed_redundant``, ``routed_dropped``; ``acquire_transient``: acquire misses admission
        declined, loaded into transient slots (evicted before any admitted expert)."""
    def reset_stats(self) -> None:
        """Zero every counter, including ``stream_waits`` and a probe's ``seconds()``; stream-wait
        timings not yet resolved are dropped."""
    def close(self) -> None:
        """Join the workers, wait for copies, free owned slot memory. Idempotent."""
    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> SlotCache: ...
    def __exit__(self, *exc: object) -> None: ...

class StreamWaitProbe:
    """While open, ``cache`` times the caller's streams' waits on slot-ready events (CUDA only;
    several probes may be open, the timing stops when the last closes and keeps what it measured).

    An ``acquire`` that finds a slot's copy still in flight (its ready event not complete,
    ``cuEventQuery``) records a timing event on its stream just before it makes the stream wait
    on the slots' ready events and another just after; the device time between the two is the
    time the stream was blocked on copies. An acquire whose copies have all landed records
    nothing (its wait is zero), so the host's own time inside ``acquire`` is never counted.
    Copies are synchronous on the host backend: nothing is ever recorded there. Opening a probe
    on a closed cache raises ClosedError."""

    def __init__(self, cache: SlotCache) -> None: ...
    def seconds(self) -> float:
        """Seconds the caller streams waited on slot-ready events of copies still in flight,
        summed over the acquires timed since the cache's last ``reset_stats`` (0.0 on the host
        backend). Blocks until the stream work of those acquires has reached its end timing event
        (an event synchronize). After the cache's ``close``: the total as of close."""
    def close(self) -> None:
        """Stop timing (if no other probe is open); idempotent. What was measured is kept."""
    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> StreamWaitProbe: ...
    def __exit__(self, *exc: object) -> None: ...

class RoutingFeed:
    """Expert ids computed on the device handed to ``cache`` without the submitting thread waiting
    for them: a decode step's routing (``submit_routed``) and a predictor's top-k
    (``submit_predicted``). Each submission queues, on the caller's stream, an asynchronous copy
    of the ids into page-locked staging and an event; one native thread (no GIL) waits for each
    event in submission order and hands the ids to the cache. Close the feed before its cache
    (a closed cache makes later requests fail with ClosedError, kept for ``take_error``);
    closing handles what was submitted, stops the thread and frees the staging memory."""

    def __init__(self, cache: SlotCache) -> None: ...
    def submit_routed(self, ids_ptr: int, layers: Sequence[int], width: int, stream: int | None = None) -> None:
        """The cache's ``note_routed`` for ``len(layers)`` rows still being written on ``stream``, each ``width``
        int64 ids (negative: padding) followed by the ``width`` expert-table entries (addresses)
        those pairs read: hits and misses count what the step read (a slot address or not). An
        asynchronous copy to staging and an event are queued there and a native thread handles
        the rows once they land (``wait`` waits)."""
    def submit_predicted(
        self,
        ids_ptr: int,
        layers: Sequence[int],
        width: int,
        stream: int | None = None,
        generation: int = 0,
        priority: Priority = "prefetch",
        future: bool = False,
        skip_routed: bool = False,
        remember: bool = False,
        forget: bool = False,
        feed_only: bool = False,
        after_next: bool = False,
    ) -> None:
        """Prefetch expert ids that the device is still computing, without waiting for them.

        ``ids_ptr``: address of ``len(layers) * width`` contiguous int64 ids (row ``i``: ``width``
        experts of MoE layer ``layers[i]``), in device memory on the CUDA backend (host memory on
        the host backend), written by work on ``stream`` (a CUstream handle; None: the default
        stream) and not overwritten by any other stream until the copy queued here has run. Queues
        an asynchronous copy into page-locked staging and an event on ``stream``, and returns; a
        native thread waits for the event (no GIL held), then per row: distinct ids;
        ``future``: the rows are the next cache visits in order (acquire calls and table visits,
        counted from this call on, after the routed rows submitted before it) -- rows whose visit
        already happened are skipped (also with ``skip_routed``), the rest feed the cache's ``set_future``;
        ``remember``: keep the rows as the prediction that each layer's next routed row
        (``submit_routed``) is scored against (``stats``: ``predicted_*``); ``forget``: drop the
        remembered prediction instead (a new sequence); then the cache's ``prefetch`` of each row, unless
        ``feed_only`` (the rows only feed the policy and the scores: no loads). ``after_next``:
        the rows are the step after the next one (a predictor of the next token's routing): for
        ``future`` / ``skip_routed`` they count from one step (``len(layers)`` visits) later, and a
        remembered row is scored against its layer's routed row after the next. Requests are
        handled in submission order. Errors met by the thread
        (an expert out of range) are kept for ``take_error``. The pointer is not checked:
        a wrong address is undefined behaviour, as with ``ExpertPool.write_ptr``. At most 2**24 ids
        (``len(layers) * width``) per call, else InvalidArgumentError."""
    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every request submitted so far has been handled; False on timeout."""
    def take_error(self) -> str | None:
        """The first error the thread met since the last call, cleared (None: none)."""
    def stats(self) -> dict[str, float]:
        """``deferred_submitted`` / ``deferred_handled`` / ``deferred_queued``: requests so far,
        those handled, and the loads they queued; ``predicted_hits`` / ``predicted_needed`` /
        ``predicted_experts``: over the layers whose remembered prediction was scored, routed
        experts that were predicted, routed experts, and predicted experts (recall = hits /
        needed, precision = hits / predicted)."""
    def reset_stats(self) -> None:
        """Zero the prediction scores (the ``deferred_*`` counts keep running)."""
    def close(self) -> None:
        """Handle what was submitted, stop the thread, free the staging memory. Idempotent."""
    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> RoutingFeed: ...
    def __exit__(self, *exc: object) -> None: ...

def check_cache_options(policy: str, copy_workers: int) -> None:
    """Raise InvalidArgumentError for a policy name or copy-worker count that ``SlotCache`` would
    refuse (checked by the same code), before a pool or model is touched."""

def simulate_policy(
    policy: Policy,
    num_slots: int,
    trace: Sequence[tuple[int, Sequence[int]]],
    future: bool = True,
    path: Literal["acquire", "table", "prefetch"] | Sequence[Literal["acquire", "table", "prefetch"]] = "acquire",
    count_from: int = 0,
) -> dict[str, int]:
    """Run the eviction policy alone over a trace of visits (no copies). ``path="acquire"``
    loads every miss before its visit (prefill, the eager path); ``path="table"`` reads misses in
    place and loads the ones the cache admits (decode through the expert table, copies taken
    to land before the next visit); a sequence gives each visit its own path (as many as
    visits). A ``"prefetch"`` visit is a prediction, not a lookup: its experts not resident are
    loaded as speculative prefetches (never evicting another prefetch not used yet), and a run
    of them is the policy's future for the visits after it, in order. For "predictive" with
    ``future=True`` the policy is fed the trace itself (Belady's optimum on the acquire path;
    not with prefetch visits). Returns hits, misses, evictions, loads (experts copied into a
    slot), prefetches (loads of prefetch visits) and prefetch_used (hits on a prefetched slot
    not used before) of the visits from ``count_from`` on (in [0, len(trace)]); the earlier ones
    still fill the cache and feed the policy. Same policy code as SlotCache. ``num_slots`` >= 1;
    slots beyond the trace's distinct experts change nothing, so any larger budget is accepted."""
