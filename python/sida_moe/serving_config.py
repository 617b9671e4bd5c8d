"""The options of one offloaded model, resolved and checked once, before any model is built,
loaded or moved, and passed down to the engine build (``EngineBuilder``).

``offload``, ``from_pretrained`` and the presets take the same keyword arguments and turn them
into a :class:`ServingConfig` with :meth:`ServingConfig.resolve`; the engine keeps it
(``engine.config``). Settings from the environment are in ``sida_moe.environment``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sida_moe.budget import BudgetSpec, check_budget
from sida_moe.engine import check_backend, check_cache_options
from sida_moe.prefetchers import Prefetcher, make_prefetcher

@dataclass(frozen=True)
class ServingConfig:
    """What an offloaded model is served with (the arguments of ``offload``, whose docstring says
    what each means), checked: make one with :meth:`resolve`."""

    gpu_budget: BudgetSpec
    policy: str
    prefetcher: Prefetcher
    backend: str
    copy_workers: int
    progress: bool

    @classmethod
    def resolve(
        cls,
        gpu_budget: BudgetSpec = "12GiB",
        policy: str = "lru",
        prefetch: str | Prefetcher | None = "next_layer_gate",
        backend: str = "auto",
        copy_workers: int = 2,
        progress: bool = False,
    ) -> ServingConfig:
        """The config of these arguments; ValueError (InvalidArgumentError for the cache's options)
        or TypeError naming the wrong option and what is allowed. Whether the budget holds enough
        slots for the model is checked once its experts are known (BudgetError)."""
        check_budget(gpu_budget)
        check_cache_options(policy, copy_workers)
        check_backend(backend)
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
        return cls(gpu_budget, policy, make_prefetcher(prefetch), backend, copy_workers, progress)


__all__ = ["ServingConfig"]
