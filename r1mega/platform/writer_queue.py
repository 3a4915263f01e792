"""megatron's checkpoint-writer result queue, started early and bound to this process's lifetime.

Why a module of its own, with no torch import at its top: the queue's Manager is a spawned process that
unpickles its initializer, importing this module. Kept in ``ckpt/dist_ckpt`` (which imports torch and
megatron), that child spent about 2.5 s importing them before it served, and ``r1mega train`` waited for
it at the start of every run.
"""

from __future__ import annotations


def _server_init(guard) -> None:
    """First thing in the writer queue's Manager process: die with the trainer (``guard``), then import
    ``torch.distributed.checkpoint`` in a thread while the server already serves. Every write result the
    queue receives unpickles into those classes; imported on the first ``put`` instead, that import (torch
    with it, ~1.7 s) stalled the first checkpoint save of every process.

    The process ends without Python's module teardown (``lifetime.exit_now`` as its last exit hook, after
    multiprocessing's own exit handling): with torch imported, that teardown took about 0.6 s, which the
    trainer's exit spent waiting for its Manager to stop."""
    import atexit
    import importlib
    import threading

    from r1mega.platform.lifetime import exit_now

    guard()
    atexit.register(exit_now, 0)
    threading.Thread(target=importlib.import_module, args=("torch.distributed.checkpoint",), daemon=True).start()


def start_writer_queue() -> None:
    """Start megatron's checkpoint-writer result queue now (idempotent; collective-free, every process its own).

    megatron's checkpoint writer reports through a ``multiprocessing`` Manager process that it spawns on
    the first save. Slurm and torchrun send SIGTERM to the whole process group on preemption, which killed
    that process, so the checkpoint the signal asks for failed with a BrokenPipeError. It is started here, in
    megatron's place, with the stop signals ignored (an ignored signal stays ignored in the spawned process)
    and bound to this process's lifetime: it ignores SIGTERM, so it must die with its parent on its own
    (``r1mega.platform.lifetime``). A run that will checkpoint starts it early (``r1mega train`` does, before
    its first stage), so that the Manager's imports are done by the first save."""
    import multiprocessing
    import signal
    import threading
    from multiprocessing.managers import SyncManager

    from r1mega.platform.lifetime import child_guard
    from r1mega.platform.megatron_compat import ensure_megatron

    ensure_megatron()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if (not hasattr(filesystem_async, "_get_write_results_queue")  # a megatron that starts no Manager
            or getattr(filesystem_async, "_results_queue", None) is not None):
        return

    def start() -> None:  # what megatron's _get_write_results_queue does, plus the initializer
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=_server_init, initargs=(child_guard(),))
        filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive

    if threading.current_thread() is not threading.main_thread():
        start()
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        start()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
