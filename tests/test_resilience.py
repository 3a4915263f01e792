"""Reliability pieces without vLLM: stop-signal agreement and rollout failures across ranks, resume
path resolution and its errors, the non-finite-step policy, and an engine child process that dies."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from r1mega.ckpt import CheckpointNotFoundError, IncompleteCheckpointError
from r1mega.config.schema import R1Config
from r1mega.platform.spawn import spawn_ranks
from r1mega.train.resilience import Checkpointer, StopSignal, check_skip

WORKER = str(Path(__file__).with_name("resilience_worker.py"))


@pytest.mark.timeout(120)
def test_stop_signal_and_rollout_failure_reach_every_rank(tmp_path):
    spawn_ranks([WORKER, str(tmp_path)], 2, timeout_s=100, name="resilience")
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["before"] is None and r["after"] == "SIGUSR1", r  # rank 1's signal stops rank 0 too
        assert r["handler_restored"]
        assert "grpo step 7" in r["failure"] and "generate" in r["failure"], r
        assert r["next"] == "fine"
    assert "reported by rank 0" in json.loads((tmp_path / "rank1.json").read_text())["failure"]


def test_stop_signal_in_one_process():
    with StopSignal() as stop:
        assert stop.agreed() is None
        os.kill(os.getpid(), signal.SIGTERM)  # would end the test process without the handler
        assert stop.agreed() == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def _checkpointer(tmp_path, resume: str) -> Checkpointer:
    cfg = R1Config()
    cfg.trainer.output_dir = str(tmp_path / "run")
    cfg.checkpoint.resume = resume
    return Checkpointer(cfg, tm=None, metrics_path=tmp_path / "run" / "metrics.jsonl")


def test_resume_path(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    assert _checkpointer(tmp_path, "auto").resume_path() is None  # nothing saved yet: start afresh
    (root / "step_000004").mkdir(parents=True)  # a save that never committed (no meta.json) is not resumed
    (root / ".tmp_step_000006_ab").mkdir()
    assert _checkpointer(tmp_path, "auto").resume_path() is None
    (root / "step_000002").mkdir()
    (root / "step_000002" / "meta.json").write_text("{}")
    (root / "latest").write_text("step_000002\n")
    assert _checkpointer(tmp_path, "auto").resume_path() == root / "step_000002"
    assert _checkpointer(tmp_path, "none").resume_path() is None
    with pytest.raises(CheckpointNotFoundError, match=str(tmp_path / "nowhere")):
        _checkpointer(tmp_path, str(tmp_path / "nowhere")).resume_path()
    with pytest.raises(IncompleteCheckpointError, match="step_000004 is incomplete.*earlier complete"):
        _checkpointer(tmp_path, str(root / "step_000004")).resume_path()
    (root / "latest").write_text("step_000009\n")  # names a checkpoint deleted by hand
    with pytest.raises(CheckpointNotFoundError, match="step_000009, which does not exist"):
        _checkpointer(tmp_path, "auto").resume_path()


def test_nonfinite_step_policy():
    ok = SimpleNamespace(skipped=False, values={"loss": 1.0}, grad_norm=1.0)
    bad = SimpleNamespace(skipped=True, values={"loss": math.nan}, grad_norm=math.nan)
    assert check_skip(ok, "grpo", 3, True) == 0 and check_skip(bad, "grpo", 3, True) == 1
    with pytest.raises(FloatingPointError, match="grpo step 3.*skip_nonfinite_loss=true"):
        check_skip(bad, "grpo", 3, False)


class _FailingEngine:
    def generate(self, prompts, n, sampling):
        raise RuntimeError("engine exploded")


def test_rollout_failure_names_the_step_and_component():
    from r1mega.rollout import SamplingSpec
    from r1mega.train.grpo import Prompt
    from r1mega.train.schedules import sample_and_score
    from r1mega.train.weight_sync import RolloutFailure

    with pytest.raises(RolloutFailure, match="grpo step 3: the rollout engine failed in generate.*engine exploded"):
        sample_and_score(_FailingEngine(), None, [Prompt([1, 2], "1+1", "2")], 2, SamplingSpec(), None, step=3)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["exited", "killed"])
def test_dead_engine_process_raises_with_context(how):
    """A child that died before a call, or dies while the learner waits for its answer, is an error
    naming the call and the exit status, not a hang."""
    import threading
    import time

    from r1mega.rollout.vllm_engine import EngineProcess, EngineProcessError

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    target, args = (os._exit, (3,)) if how == "exited" else (time.sleep, (60,))
    proc = ctx.Process(target=target, args=args, daemon=True)
    proc.start()
    child.close()
    engine = EngineProcess.__new__(EngineProcess)  # no vLLM: only the pipe protocol is under test
    engine._conn, engine._proc = parent, proc
    if how == "exited":
        proc.join(30)
        expected = r"died during generate \(already dead before the call\) \(exit code 3\)"
    else:
        threading.Timer(1.0, os.kill, (proc.pid, signal.SIGKILL)).start()
        expected = r"died during generate \(killed by signal 9\)"
    t0 = time.monotonic()
    with pytest.raises(EngineProcessError, match=expected):
        engine.generate([[1, 2]], 1, None)
    assert time.monotonic() - t0 < 20


@pytest.mark.timeout(180)
def test_damaged_checkpoint_names_the_path_and_the_previous_one(tmp_path, single_process_megatron):
    from r1mega.ckpt import CheckpointError
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig, OptimizerConfig, ParallelConfig
    from r1mega.train.model_setup import build_training_model

    model = resolve_model(ModelConfig(preset="qwen3_moe"))
    tm = build_training_model(model, ParallelConfig(), OptimizerConfig(), total_steps=4)
    ckpt = _checkpointer(tmp_path, "auto")
    ckpt.tm, ckpt.model_cfg = tm, model
    for step in (1, 2):
        ckpt.global_step = step
        ckpt.save("grpo", step, {"consumed_samples": 4 * step})
    latest = ckpt.resume_path()
    assert latest.name == "step_000002"
    for shard in latest.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])  # a torn write the atomic commit cannot see
    with pytest.raises(CheckpointError, match=f"could not load checkpoint {latest} .*EOFError.*resume="
                                              f"{latest.parent / 'step_000001'}"):
        ckpt.load(latest)
    extra = ckpt.load(latest.parent / "step_000001")
    assert (extra["stage"], extra["stage_step"], extra["consumed_samples"]) == ("grpo", 1, 4)
