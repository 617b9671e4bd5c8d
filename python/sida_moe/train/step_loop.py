"""The optimiser loop every training run here shares: a step budget (a step count, cut to a
wall-clock limit once the steady step time is known) and the step itself (loss, backward,
clipping, optimiser and schedule step, loss recorded, progress bar)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

_UNBOUNDED = 10**9  # a step count no run reaches: the time limit decides


class StepBudget:
    """How many steps a run takes: ``cap`` (None: as many as ``max_seconds`` allows), cut to what
    fits in ``max_seconds``. ``total`` is the current estimate; a schedule that reads it (e.g. a
    cosine decay to the last step) follows each cut."""

    def __init__(self, cap: int | None, max_seconds: float | None) -> None:
        if cap is None and max_seconds is None:
            raise ValueError("a step budget needs a step count or a time limit")
        self.cap = cap
        self.max_seconds = max_seconds
        self._limit = cap if cap is not None else _UNBOUNDED
        self.total = self._limit
        self._t0 = self._t20 = time.perf_counter()

    def start(self) -> None:
        self._t0 = self._t20 = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since :meth:`start`."""
        return time.perf_counter() - self._t0

    def update(self, step: int) -> None:
        """Re-estimate ``total`` after ``step`` steps (every 10 from step 20 on)."""
        if self.max_seconds is None or step < 20 or step % 10:
            return
        # The first steps are slow (cuDNN plans, allocator warm-up): an estimate from them alone
        # would stop a time budget far too early, so it is taken from the steady rate.
        now = time.perf_counter()
        if step == 20:
            self._t20, per_step = now, (now - self._t0) / 20
        else:
            per_step = (now - self._t20) / (step - 20)
        left = max(0.0, self.max_seconds - (now - self._t0))
        self.total = max(step + 1, min(self._limit, step + int(left / per_step)))

    @property
    def stopped_by(self) -> str:
        """"max_seconds" when the time limit cut the step count below the cap, else "steps"."""
        return "max_seconds" if self.max_seconds is not None and self.total < self._limit else "steps"


@dataclass
class StepRun:
    steps: int
    seconds: float
    stopped_by: str
    losses: list[float] = field(default_factory=list)


def run_steps(
    budget: StepBudget,
    step_loss: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    parameters: Iterable[torch.nn.Parameter],
    grad_clip: float,
    desc: str,
    progress: bool,
    postfix_every: int = 50,
) -> StepRun:
    """Run ``budget``'s steps of ``step_loss()`` (the loss of one fresh batch); ``grad_clip`` > 0
    clips the gradient norm of ``parameters``."""
    from tqdm.auto import tqdm

    params = list(parameters)
    losses: list[float] = []
    budget.start()
    bar = tqdm(total=budget.cap, desc=desc, disable=not progress)
    step = 0
    while step < budget.total:
        budget.update(step)
        if budget.total < _UNBOUNDED:
            bar.total = budget.total
        loss = step_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if step % postfix_every == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.update(1)
        step += 1
    bar.close()
    return StepRun(step, budget.elapsed(), budget.stopped_by, losses)


__all__ = ["StepBudget", "StepRun", "run_steps"]
