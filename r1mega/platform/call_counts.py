"""Counts of the calls that cost a step latency: collectives and round trips to a rollout engine.

Why: an extra host sync or engine round trip per step costs little on a CPU timing and a lot on GPUs
at small batches; counted per step (``calls/*`` in each GRPO metrics line), a regression fails a test
(``tests/test_step_budget.py``) instead of hiding in noise. Collectives are counted where code calls
them through ``torch.distributed``'s module attributes (megatron and r1mega both do), and where they call
the CPU emulation's replacements (megatron keeps references to some from its import, before
:func:`install`): those are counted themselves (:func:`counted`). A collective that an emulated one is
built from counts once, as the call the code made.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter

import torch.distributed as dist

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
    "reduce_scatter_tensor", "_all_gather_base", "_reduce_scatter_base", "broadcast", "broadcast_object_list",
    "all_to_all", "all_to_all_single", "barrier", "gather", "gather_object", "scatter", "reduce", "send", "recv",
    "batch_isend_irecv",
)  # not isend / irecv: P2POp (pipeline sends) accepts only torch's own functions, by identity

_counts: Counter = Counter()
_depth = threading.local()


def counted(fn):
    """``fn`` counting one collective per outermost call (calls made inside it are not counted)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        outer = not getattr(_depth, "n", 0)
        if outer:
            _counts["collectives"] += 1
        _depth.n = getattr(_depth, "n", 0) + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _depth.n -= 1

    wrapper._r1mega_counted = True
    return wrapper


def install() -> None:
    """Wrap ``torch.distributed``'s collectives once (after the CPU emulation replaced any it replaces)."""
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None and not getattr(fn, "_r1mega_counted", False):
            setattr(dist, name, counted(fn))


def count(kind: str, n: int = 1) -> None:
    """Record ``n`` calls of ``kind`` (e.g. ``engine_round_trips``)."""
    _counts[kind] += n


def snapshot() -> Counter:
    return Counter(_counts)


def since(start: Counter) -> dict[str, int]:
    """``calls/<kind>`` since ``start`` (every kind, zeros included)."""
    return {f"calls/{k}": _counts[k] - start[k] for k in ("collectives", "engine_round_trips")}
