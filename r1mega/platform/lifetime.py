"""Nothing outlives its run: every process r1mega starts is killed when the process that started it ends,
however that ends (SIGKILL and the out-of-memory killer included).

The mechanism is Linux's parent-death signal, ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, set in the child: the
kernel SIGKILLs the child when its parent goes, whatever signals the child ignores (the checkpoint writer
and the engine processes ignore SIGTERM, so that a preemption signal sent to the whole process group still
gets its checkpoint). Applied at every start, it chains: a grandchild dies with its parent, and so on.
Two details of it are handled here:

- it fires when the *thread* that started the child ends, not the process. A multiprocessing child started
  from another thread than the main thread gets a watchdog thread instead, which waits on multiprocessing's
  parent sentinel (a pipe that closes when the parent process ends); so does a forkserver's child (a reward
  worker), whose parent, the forkserver, lives as long as its children. A ``subprocess`` child is started by
  a thread that waits for it (the sandbox, the launcher), so the thread outlives it;
- a parent that died before the child set the signal: after setting it the child checks that its parent
  is still there, and kills itself if not.

:func:`child_guard` (multiprocessing children: a Manager's or pool's ``initializer``, or the first call of a
process's target) and :func:`exec_guard` (``preexec_fn`` of ``subprocess.Popen``; the signal survives exec)
are made in the parent and called in the child. :func:`die_with_parent` is for a process started by a
program that is not r1mega's (a torchrun worker).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import multiprocessing
import os
import signal
import sys
import threading
from typing import Callable, Optional

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@functools.lru_cache(maxsize=None)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True)


def set_parent_death_signal() -> bool:
    """SIGKILL this process when the thread that started it ends; False where Linux's prctl is missing."""
    libc = _libc()
    if libc is None:
        return False
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    return True


@functools.lru_cache(maxsize=None)
def _unsupported() -> None:
    log.warning("no parent-death signal on %s: processes started by this run may outlive it if it is killed",
                sys.platform)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(sentinel) -> None:
    from multiprocessing.connection import wait

    wait([sentinel])  # readable (EOF) once the parent process is gone
    _kill_self()


def die_with_parent(parent_pid: Optional[int] = None, *, watch: bool = False) -> None:
    """In a child: end it when its parent ends (see the module docstring). ``parent_pid``: the parent it
    must still have (None: a multiprocessing child checks its parent's sentinel). ``watch``: use a watchdog
    thread on the parent sentinel instead of the signal: the parent started this child from a thread that
    may end first, or the child's parent process is not the one it must die with (a forkserver's child:
    the forkserver lives as long as any of its children, which hold its pipe)."""
    parent = multiprocessing.parent_process()
    if watch:
        if parent is None:
            raise RuntimeError("die_with_parent(watch=True) needs a multiprocessing child (a parent sentinel)")
        threading.Thread(target=_watch, args=(parent.sentinel,), daemon=True, name="r1mega-parent-watch").start()
    elif not set_parent_death_signal():
        _unsupported()
    gone = os.getppid() != parent_pid if parent_pid is not None else parent is not None and not parent.is_alive()
    if gone:  # the parent died before the signal was set: nobody is left to send it
        _kill_self()


def child_guard() -> Callable[[], None]:
    """Made in the parent, called first in a multiprocessing child (picklable, for any start method)."""
    return functools.partial(die_with_parent, None, watch=threading.current_thread() is not threading.main_thread())


def _exec_guard(parent_pid: int, then: Optional[Callable[[], None]]) -> None:
    if then is not None:
        then()
    set_parent_death_signal()
    if os.getppid() != parent_pid:
        _kill_self()


def exec_guard(then: Optional[Callable[[], None]] = None) -> Callable[[], None]:
    """``preexec_fn`` for ``subprocess.Popen``: runs ``then`` (the caller's own preexec), then sets the signal.
    The child dies with the thread that calls Popen, so call it from one that outlives the child."""
    if _libc() is None:  # loaded here: the child runs between fork and exec, where loading a library may hang
        _unsupported()
    return functools.partial(_exec_guard, os.getpid(), then)


_forking = threading.local()
_fork_hook_installed = False


def _before_fork() -> None:
    _forking.parent = (os.getpid(), threading.current_thread() is threading.main_thread())


def _after_fork_in_child() -> None:
    parent_pid, main_thread = getattr(_forking, "parent", (None, False))
    if main_thread:  # a fork from another thread would die with that thread: left to its library
        die_with_parent(parent_pid)


def forked_children_die_with_this_process() -> None:
    """Children that libraries fork from this process's main thread (``os.fork``, multiprocessing's fork
    start method: megatron's checkpoint write workers) die with it (idempotent)."""
    global _fork_hook_installed
    if _fork_hook_installed:
        return
    _libc()  # loaded now, not in a forked child of a process with threads
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _fork_hook_installed = True


def exit_now(code: int = 0) -> None:
    """End this process once its work is done and its exit handling has run: logging and the standard
    streams flushed, then ``os._exit``, without Python's teardown of every imported module (about 1 s with
    torch imported, 1.8 s with vLLM, on 2 cores), which whoever waits for the process would wait through.
    The caller runs whatever exit handling the process needs first (see ``r1mega.cli.run``)."""
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
