"""The `r1mega lm-demo` entry point (the supervised placeholder demo) end to end, on one and two processes,
and the CLI's config errors. The R1 demo (`r1mega demo`) is tested in test_grpo_loop.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1mega.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("nproc,layout", [(1, []), (2, []), (2, ["parallel.tp=2"])])
def test_demo_learns(tmp_path, nproc, layout):
    out = tmp_path / "run"
    proc = _run(["lm-demo", "--nproc", str(nproc), "trainer.steps=40", f"trainer.output_dir={out}", *layout])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == nproc
    # answer loss on held-out problems drops well below the untrained ~ln(vocab)
    assert summary["eval/answer_loss_after"] < 0.5 * summary["eval/answer_loss_before"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 41))
    assert "held-out answer loss" in proc.stdout


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
