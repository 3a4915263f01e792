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
