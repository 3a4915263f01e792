"""``r1mega.platform.lifetime``: a child that ignores SIGTERM still dies when its parent is SIGKILLed, for each
way r1mega starts one (subprocess, multiprocessing spawn, from a short-lived thread, a library's fork, a
forkserver pool: the worker and the forkserver); a
child whose parent is already gone when it sets the signal kills itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = str(Path(__file__).with_name("lifetime_worker.py"))
REPO = str(Path(__file__).resolve().parents[1])


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["popen", "spawn", "thread", "fork", "forkserver"])
def test_child_dies_with_its_killed_parent(kind):
    parent = subprocess.Popen([sys.executable, WORKER, kind], stdout=subprocess.PIPE, text=True, env=_env())
    children = []
    try:
        children = [int(pid) for pid in parent.stdout.readline().split()]
        time.sleep(0.3)  # "thread": the thread that started the child has ended; the child must outlive it
        assert children and all(map(_alive, children)), f"a {kind} child died while its parent lives"
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(map(_alive, children)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, children)), f"a {kind} child outlived its parent"
    finally:
        parent.kill()
        parent.wait()
        for child in filter(_alive, children):
            os.kill(child, signal.SIGKILL)


@pytest.mark.timeout(30)
def test_child_of_a_parent_already_gone_kills_itself():
    """The race: the parent died before the child set the signal (here: the parent it names is not its own)."""
    code = "from r1mega.platform.lifetime import die_with_parent; die_with_parent(1); print('survived')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=20)
    assert proc.returncode == -signal.SIGKILL and "survived" not in proc.stdout, proc
