"""``torch.compile`` as the decode loops use it.

A compiled decode step is specialised to its shapes (``dynamic=False``: batch size, static cache
length, the predictor's capacity), so every new shape compiles once more. ``torch._dynamo`` keeps
at most ``recompile_limit`` (default 8) compiled versions of one function and past that runs it
eagerly with only a warning: a server that sees a few batch sizes and lengths would silently lose
its compiled step. The loops therefore compile inside :func:`recompile_room`, which raises the
limits while they run; how many shapes they hold at once is bounded by the loops themselves
(``decode_graph.MAX_KEPT_STEPS``, the prefetcher's decoders).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# compiled versions of one decode function kept by torch._dynamo (each one shape of a decode step)
RECOMPILE_ROOM = 64


@contextlib.contextmanager
def recompile_room() -> Iterator[None]:
    """Run a compiled decode step with room for :data:`RECOMPILE_ROOM` compiled shapes of it (a
    larger limit set by the user is kept)."""
    import torch._dynamo

    config = torch._dynamo.config
    limits = {}
    for name, room in (("recompile_limit", RECOMPILE_ROOM), ("accumulated_recompile_limit", 4 * RECOMPILE_ROOM)):
        if hasattr(config, name):
            limits[name] = max(int(getattr(config, name)), room)
    with config.patch(**limits):
        yield


__all__ = ["RECOMPILE_ROOM", "recompile_room"]
