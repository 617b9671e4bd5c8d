"""sida-moe: serve Mixture-of-Experts models whose experts do not fit in GPU memory.

Expert weights live in exact-size pinned host pools; a GPU slot cache holds a budgeted subset;
a data-aware predictor (SiDA's hash function) prefetches the experts each layer will need while
the model runs. Exact by default: outputs equal the original model's.

The names below load on first use (PEP 562): ``import sida_moe`` imports no torch, and a
setting the environment gets wrong (``sida_moe.environment``) fails inside the command line,
which reports it in one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sida_moe._lazy import lazy_exports

# public name -> the module that defines it
_HOME = {
    **dict.fromkeys(
        ["Backend", "BudgetError", "ClosedError", "CudaError", "ExpertPool", "InvalidArgumentError", "LoadError",
         "OutOfMemoryError", "RoutingFeed", "SidaMoeError", "SlotCache", "SlotStateError", "StreamWaitProbe",
         "UnknownExpertError", "__version__", "simulate_policy"],
        "sida_moe._native",
    ),
    **dict.fromkeys(["ExpertFormat", "SlotWeights", "slot_views"], "sida_moe.format"),
    "OffloadEngine": "sida_moe.engine",
    **dict.fromkeys(["engine_of", "from_pretrained", "offload"], "sida_moe.offloading"),
    **dict.fromkeys(["NextLayerGate", "NoPrefetch", "Prefetcher"], "sida_moe.prefetchers"),
    "ServingConfig": "sida_moe.serving_config",
}


__getattr__, __dir__ = lazy_exports(__name__, _HOME)

if TYPE_CHECKING:
    from sida_moe._native import (
        Backend,
        BudgetError,
        ClosedError,
        CudaError,
        ExpertPool,
        InvalidArgumentError,
        LoadError,
        OutOfMemoryError,
        RoutingFeed,
        SidaMoeError,
        SlotCache,
        SlotStateError,
        StreamWaitProbe,
        UnknownExpertError,
        __version__,
        simulate_policy,
    )
    from sida_moe.engine import OffloadEngine
    from sida_moe.format import ExpertFormat, SlotWeights, slot_views
    from sida_moe.offloading import engine_of, from_pretrained, offload
    from sida_moe.prefetchers import NextLayerGate, NoPrefetch, Prefetcher
    from sida_moe.serving_config import ServingConfig

__all__ = [
    "Backend",
    "BudgetError",
    "ClosedError",
    "CudaError",
    "ExpertFormat",
    "ExpertPool",
    "InvalidArgumentError",
    "LoadError",
    "NextLayerGate",
    "NoPrefetch",
    "OffloadEngine",
    "OutOfMemoryError",
    "Prefetcher",
    "RoutingFeed",
    "ServingConfig",
    "SidaMoeError",
    "SlotCache",
    "SlotStateError",
    "SlotWeights",
    "StreamWaitProbe",
    "UnknownExpertError",
    "__version__",
    "engine_of",
    "from_pretrained",
    "offload",
    "simulate_policy",
    "slot_views",
]
