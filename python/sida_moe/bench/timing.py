"""Decode timing of a generate call, one way for every system: per round, a call for 1 new token
and one for N, back to back; decode time per step = (t(N) - t(1)) / (N - 1), so prefill and the
first token cancel whatever loop produces the tokens (transformers' own, a replayed CUDA graph).
Several rounds, the systems interleaved, give a median and a spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def _sync(device: torch.device | None) -> None:
    # The current (compute) stream only, as a generation loop that reads its tokens waits for it.
    # A device-wide sync would also wait for work that serves later tokens on other streams --
    # prefetch copies, the run-ahead predictor's launches -- and put it on every token's time.
    if device is not None and device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


@dataclass
class Call:
    """One timed call: wall time and process CPU time (every thread: the engine's copy and
    routing threads too), and what the call returned."""

    wall_s: float
    cpu_s: float
    out: Any = None


def timed(fn: Callable[[], Any], device: torch.device | None) -> Call:
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return Call(time.perf_counter() - w0, time.process_time() - c0, out)


@dataclass
class Round:
    """One visit of a system: the 1-token and the N-token call, and what ``after`` observed right
    after each (untimed; e.g. the engine's counters)."""

    first: Call
    full: Call
    first_seen: dict = field(default_factory=dict)
    full_seen: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # per-visit figures the caller adds


def two_calls(generate: Callable[[int], Any], n: int, device: torch.device | None,
              before: Callable[[], None] | None = None, after: Callable[[], dict] | None = None) -> Round:
    """``generate(1)`` then ``generate(n)``, each timed; ``before`` runs (untimed) ahead of each
    call, ``after`` after it."""
    if n < 2:
        raise ValueError(f"n must be at least 2 (a first token and one decode step), got {n}")
    seen = []
    calls = []
    for k in (1, n):
        if before is not None:
            before()
        calls.append(timed(lambda k=k: generate(k), device))
        seen.append(after() if after is not None else {})
    return Round(calls[0], calls[1], seen[0], seen[1])


def interleave(visits: dict[str, Callable[[], Round]], rounds: int) -> dict[str, list[Round]]:
    """``rounds`` rounds of every visit, in the given order in even rounds and reversed in odd ones
    (no system always runs first, after the same neighbour)."""
    out: dict[str, list[Round]] = {name: [] for name in visits}
    for r in range(rounds):
        for name in (list(visits) if r % 2 == 0 else list(reversed(visits))):
            out[name].append(visits[name]())
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclass
class DecodeTiming:
    """The rounds of one system at one batch size, N = ``new_tokens``."""

    batch_size: int
    prompt_tokens: int
    new_tokens: int
    rounds: list[Round]

    def step_seconds(self) -> list[float]:
        """Decode time per step of each round."""
        return [(r.full.wall_s - r.first.wall_s) / (self.new_tokens - 1) for r in self.rounds]

    def cpu_seconds_per_step(self) -> list[float]:
        """Process CPU time per decode step of each round (same difference as the wall time)."""
        return [(r.full.cpu_s - r.first.cpu_s) / (self.new_tokens - 1) for r in self.rounds]

    def summary(self) -> dict[str, Any]:
        if not self.rounds:
            raise RuntimeError("no round was timed")
        b = self.batch_size
        step = _spread(self.step_seconds())
        first = statistics.median(r.first.wall_s for r in self.rounds)

        def rate(seconds: float) -> float:  # tokens of the whole batch per second
            return b / seconds if seconds > 0 else float("nan")

        return {
            "batch_size": b,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "rounds": len(self.rounds),
            "ttft_ms": 1e3 * first,  # the 1-token call: prefill and the first token
            "prefill_tokens_per_s": b * self.prompt_tokens / first if first > 0 else float("nan"),
            "decode_ms_per_step": 1e3 * step["median"],
            "decode_ms_per_step_min": 1e3 * step["min"],
            "decode_ms_per_step_max": 1e3 * step["max"],
            "decode_ms_per_step_rounds": [1e3 * s for s in self.step_seconds()],
            "decode_tokens_per_s": rate(step["median"]),
            "decode_tokens_per_s_min": rate(step["max"]),
            "decode_tokens_per_s_max": rate(step["min"]),
            # (slowest - fastest round) / median: how far one round can be from another
            "decode_spread": (step["max"] - step["min"]) / step["median"] if step["median"] > 0 else float("nan"),
            "process_cpu_ms_per_step": 1e3 * statistics.median(self.cpu_seconds_per_step()),
        }


def decode_seconds_per_step(generate: Callable[[int], Any], n: int, device: torch.device | None) -> float:
    """One round's decode time per step (a quick probe: choosing an implementation)."""
    return DecodeTiming(1, 0, n, [two_calls(generate, n, device)]).step_seconds()[0]
