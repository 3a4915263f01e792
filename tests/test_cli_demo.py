"""The CLI's config errors, before any process group starts. The R1 demo (`r1mega demo`) runs end to end in
test_grpo_loop.py."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1mega.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(120)
def test_bad_override_exits_2_with_a_clear_message(tmp_path):
    proc = _run(["demo", "parallel.tpp=2"])
    assert proc.returncode == 2
    assert "parallel.tpp" in proc.stderr and "did you mean" in proc.stderr


@pytest.mark.timeout(120)
def test_layout_that_does_not_fit_the_world_is_refused(tmp_path):
    proc = _run(["demo", "parallel.tp=2"])  # 1 process cannot hold tp=2
    assert proc.returncode == 2
    assert "world size 1" in proc.stderr


@pytest.mark.timeout(120)
def test_the_command_ends_with_mains_code_after_threads_and_exit_hooks(tmp_path):
    """``r1mega`` (``cli.run``) skips Python's module teardown, not what a normal exit does before it: a
    non-daemon thread finishes, exit hooks run (multiprocessing's among them), buffered output is flushed, and
    the process exits with ``main``'s code."""
    marker = tmp_path / "hook"
    script = f"""
import atexit, sys, threading, time
from pathlib import Path
from r1mega import cli

def main(argv=None):
    threading.Thread(target=lambda: (time.sleep(0.3), Path({str(marker)!r} + ".thread").write_text("done"))).start()
    atexit.register(lambda: Path({str(marker)!r}).write_text("ran"))
    sys.stdout.write("unflushed tail")
    return 3

cli.main = main
cli.run()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.endswith("unflushed tail")
    assert marker.read_text() == "ran"
    assert (tmp_path / "hook.thread").read_text() == "done"
