"""A parent for tests/test_lifetime.py: starts one kind of child bound to it, prints the pids of what it started, then
waits to be killed. Every child ignores SIGTERM (as the checkpoint writer and the engine do).

    python tests/lifetime_worker.py popen|spawn|thread|fork|forkserver
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

from r1mega.platform import lifetime

SLEEPER = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"


def sleep_forever(guard=None, ready=None) -> None:
    if guard is not None:
        guard()
    if ready is not None:
        ready.set()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)


def main(kind: str) -> None:
    if kind == "popen":
        pid = subprocess.Popen([sys.executable, "-c", SLEEPER], preexec_fn=lifetime.exec_guard()).pid
    elif kind == "spawn":
        proc = multiprocessing.get_context("spawn").Process(target=sleep_forever, args=(lifetime.child_guard(),))
        proc.start()
        pid = proc.pid
    elif kind == "thread":  # started by a thread that ends once the child is bound, long before this process
        procs, ctx = [], multiprocessing.get_context("spawn")

        def start() -> None:
            ready = ctx.Event()
            proc = ctx.Process(target=sleep_forever, args=(lifetime.child_guard(), ready))
            proc.start()
            procs.append(proc)
            ready.wait(60)

        t = threading.Thread(target=start)
        t.start()
        t.join()
        pid = procs[0].pid
    elif kind == "fork":  # forked by a library that knows nothing of r1mega
        lifetime.forked_children_die_with_this_process()
        proc = multiprocessing.get_context("fork").Process(target=sleep_forever)
        proc.start()
        pid = proc.pid
    elif kind == "forkserver":  # a reward worker pool: the worker's parent is the forkserver
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import forkserver

        from r1mega.rewards.compute import _warm_up

        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"), initializer=_warm_up,
                                   initargs=((),))
        pid = f"{pool.submit(os.getpid).result()} {forkserver._forkserver._forkserver_pid}"
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    print(pid, flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main(sys.argv[1])
