"""Probes of a model's captured decode steps, replayed outside a generate call: the host's
latency to launch one replay and hand its routing over, and the wall time per step of replays
back to back (``decode_graph`` keeps the steps; these only observe them)."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from sida_moe.decode_graph import captured_step, drain, replay_step


@torch.inference_mode()  # the step's buffers are inference tensors
def replay_host_seconds(model: nn.Module, batch_size: int, steps: int = 16, compiled: bool = False,
                        sampled: bool = False) -> float | None:
    """Median host time to launch one replay of the decode step captured for ``batch_size`` (and
    ``compiled``, ``sampled``) and hand its routing to the engine, the device idle before each
    (None if no such step was captured): the latency of the host's part of a replayed token."""
    step = captured_step(model, batch_size, compiled, sampled)
    if step is None:
        return None
    engine = getattr(model, "sida_engine", None)
    device = step.token.device
    if engine is not None:
        engine.read_table_here()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        replay_step(engine, step)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(times)


@torch.inference_mode()
def replay_back_to_back(model: nn.Module, batch_size: int, steps: int = 32, compiled: bool = False,
                        sampled: bool = False) -> float | None:
    """Replay the decode step captured for ``batch_size`` (and ``compiled``, ``sampled``)
    ``steps`` times as the decode loop does, with the device and the engine's threads drained
    before and after; returns the wall seconds per step (None if no such step was captured). A
    benchmark reads thread CPU times around it: the host's cost of decode steps alone, without a
    call's prefill."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    step = captured_step(model, batch_size, compiled, sampled)
    if step is None:
        return None
    if steps > step.tokens.shape[1]:
        raise ValueError(f"steps must be at most the captured step's cache length {step.tokens.shape[1]}, got {steps}")
    engine = getattr(model, "sida_engine", None)
    device = step.token.device
    if engine is not None:
        engine.read_table_here()
    drain(engine, device)
    t0 = time.perf_counter()
    for _ in range(steps):
        replay_step(engine, step)
    drain(engine, device)
    return (time.perf_counter() - t0) / steps


__all__ = ["replay_back_to_back", "replay_host_seconds"]
