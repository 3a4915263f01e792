"""Run one multi-process (gloo) job on this machine: ``world_size`` fresh Python processes with the
torchrun environment variables, a shared deadline, and every process killed on timeout or failure.

Used by the parity check, the checkpoint tests and other tools that need a few CPU ranks. One
multi-process run hung once on this platform: never wait on spawned ranks without a timeout.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from r1mega.platform.lifetime import exec_guard


class SpawnError(RuntimeError):
    """A rank exited with a non-zero status; the message ends with that rank's log tail."""


class SpawnTimeout(TimeoutError):
    """The job did not finish in time; every rank was killed. The message ends with a log tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of one spawned rank (torchrun variable names; one thread per CPU rank)."""
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    # The ranks import r1mega like this process did, even when it is not installed (run from a checkout).
    src = str(Path(__file__).resolve().parents[2])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if src not in paths:
        env["PYTHONPATH"] = os.pathsep.join([src, *paths])
    env.update(extra or {})
    return env


def tail(log, chars: int = 4000) -> str:
    """The last ``chars`` characters of an open (``w+``) log file."""
    log.flush()
    log.seek(0)
    return log.read()[-chars:]


def spawn_ranks(args: list[str], world_size: int, timeout_s: float, name: str = "job",
                log_dir: str | Path | None = None, env: dict[str, str] | None = None,
                fail_grace_s: float = 10.0) -> None:
    """Run ``python <args...>`` as ranks ``0..world_size-1`` and wait for all of them.

    Raises :class:`SpawnTimeout` (all ranks killed) when they do not finish within ``timeout_s``,
    and :class:`SpawnError` when a rank fails; both messages name ``name`` and end with the tail of
    the failing (or first unfinished) rank's output. Once a rank has failed, the others get
    ``fail_grace_s`` to exit before they are killed. Logs go to ``log_dir`` (a temporary folder by
    default).
    """
    with tempfile.TemporaryDirectory(prefix="r1mega-spawn-") as tmp:
        logs_at = Path(log_dir) if log_dir is not None else Path(tmp)
        logs_at.mkdir(parents=True, exist_ok=True)
        port = free_port()
        procs, logs = [], []
        try:
            for rank in range(world_size):
                log = open(logs_at / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.rank{rank}.log", "w+")
                logs.append(log)
                procs.append(subprocess.Popen([sys.executable, *args],
                                              env=rank_env(rank, world_size, port, env),
                                              stdout=log, stderr=subprocess.STDOUT, preexec_fn=exec_guard()))
            deadline = time.monotonic() + timeout_s
            failed, failed_at = None, None
            while True:
                codes = [p.poll() for p in procs]
                if failed is None:
                    failed = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
                    failed_at = time.monotonic() if failed is not None else None
                if all(c is not None for c in codes):
                    break
                now = time.monotonic()
                if failed is not None and now - failed_at > fail_grace_s:
                    break  # the others are most likely blocked in a collective with the dead rank
                if now > deadline:
                    culprit = failed if failed is not None else codes.index(None)
                    raise SpawnTimeout(f"{name} did not finish within {timeout_s:.0f}s (all {world_size} "
                                       f"ranks killed); rank {culprit} output:\n{tail(logs[culprit])}")
                time.sleep(0.05)
            if failed is not None:
                raise SpawnError(f"{name}: rank {failed} failed:\n{tail(logs[failed])}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
