"""Every path a config names is checked before any process group starts: one line per bad path (field,
path, what to do), exit code 2, no traceback. Through the real CLI and on each field."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from r1mega.config import (
    BenchmarkConfig,
    ConfigError,
    DataConfig,
    ModelRewardConfig,
    R1Config,
    RewardConfig,
    RewardTermConfig,
    StageConfig,
)
from r1mega.config.paths import check_paths, path_problems, tokenizer_problems

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "r1mega.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def _assert_clean_refusal(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "[rank" not in proc.stderr
    assert "model parallel ready" not in proc.stderr  # refused before any process group
    assert proc.stderr.count("invalid configuration") == 1, proc.stderr
    return proc.stderr.strip().splitlines()


@pytest.mark.timeout(150)
def test_cli_refuses_missing_data_and_tokenizer_before_any_process_group():
    proc = _cli("train", "--config", "configs/r1_tiny_cpu.yaml", "data.train_path=/nonexistent/train.jsonl",
                "data.tokenizer=/nonexistent/tok")
    lines = _assert_clean_refusal(proc)
    assert lines[0] == "r1mega train: invalid configuration: 2 problems"
    assert lines[1].startswith("  - data.train_path=/nonexistent/train.jsonl does not exist: point it at a JSONL")
    assert lines[2].startswith("  - data.tokenizer=/nonexistent/tok does not exist: point it at the model's")


@pytest.mark.timeout(150)
def test_cli_one_missing_path_is_one_line():
    proc = _cli("train", "--config", "configs/r1_tiny_cpu.yaml", "checkpoint.load_dir=/nonexistent/ckpt")
    assert _assert_clean_refusal(proc) == [
        "r1mega train: invalid configuration: checkpoint.load_dir=/nonexistent/ckpt does not exist: point it at an "
        "r1mega checkpoint (its root or a step_* directory)"]


@pytest.mark.timeout(150)
def test_cli_without_tokenizer_names_the_data_file_too():
    proc = _cli("sft", "--config", "configs/r1_tiny_cpu.yaml", "data.train_path=/nonexistent/train.jsonl")
    text = "\n".join(_assert_clean_refusal(proc))
    assert "data.train_path=/nonexistent/train.jsonl does not exist" in text
    assert "data.tokenizer is not set" in text and "(this one reads /nonexistent/train.jsonl)" in text


@pytest.mark.timeout(150)
def test_cli_checks_before_launching_ranks_and_for_eval():
    """A re-launching parent (--nproc 2) refuses before torchrun starts; eval checks its benchmark files."""
    proc = _cli("train", "--config", "configs/r1_tiny_cpu.yaml", "--nproc", "2", "parallel.ep=2",
                "checkpoint.load_dir=/nonexistent/ckpt")
    assert "checkpoint.load_dir=/nonexistent/ckpt does not exist" in _assert_clean_refusal(proc)[0]
    assert "torch.distributed" not in proc.stderr
    proc = _cli("eval", "--config", "configs/r1_tiny_cpu.yaml",
                "eval.benchmarks=[{name: aime, path: /nonexistent/aime.jsonl}]")
    assert "eval.benchmarks[0].path=/nonexistent/aime.jsonl does not exist" in _assert_clean_refusal(proc)[0]


def _every_path(root: Path, ok: bool) -> R1Config:
    """A config naming a path in every field that takes one: existing ones (``ok``) or missing ones."""
    p = root if ok else root / "missing"
    if ok:
        for d in ("tok", "ckpt", "resume", "teacher", "teacher_ckpt", "rm", "judge"):
            (root / d).mkdir()
        for f in ("train.jsonl", "eval.jsonl", "stage.jsonl", "tok/tokenizer.json", "teacher.yaml", "bench.json",
                  "teacher/config.json", "rm/config.json", "judge/config.json"):
            (root / f).write_text("{}")
    cfg = R1Config(data=DataConfig(train_path=str(p / "train.jsonl"), eval_path=str(p / "eval.jsonl"),
                                   tokenizer=str(p / "tok")),
                   stages=[StageConfig(name="a", data=str(p / "stage.jsonl")),
                           StageConfig(name="b", data="synthetic:addition")],
                   reward=RewardConfig(terms=[RewardTermConfig("helpful"), RewardTermConfig("judged")],
                                       models=[ModelRewardConfig(name="helpful", path=str(p / "rm")),
                                               ModelRewardConfig(name="judged", kind="judge", path=str(p / "judge"))]))
    cfg.checkpoint.load_dir = str(p / "ckpt")
    cfg.checkpoint.resume = str(p / "resume")
    cfg.distill.teacher_hf = str(p / "teacher")
    cfg.distill.teacher_checkpoint = str(p / "teacher_ckpt")
    cfg.distill.teacher_config = str(p / "teacher.yaml")
    cfg.eval.benchmarks = [BenchmarkConfig(name="b", path=str(p / "bench.json"))]
    return cfg


FIELDS = ["data.train_path", "data.eval_path", "stages[0].data", "data.tokenizer", "checkpoint.load_dir",
          "checkpoint.resume", "distill.teacher_hf", "distill.teacher_checkpoint", "distill.teacher_config",
          "eval.benchmarks[0].path", "reward.models[0].path", "reward.models[1].path"]


def test_every_named_path_is_checked(tmp_path):
    problems = path_problems(_every_path(tmp_path, ok=False))
    assert [p.split("=")[0] for p in problems] == FIELDS  # the synthetic stage is not a path
    assert all(" does not exist: point it at " in p for p in problems)
    assert path_problems(_every_path(tmp_path, ok=True)) == []


def test_wrong_kind_unreadable_and_judge_without_path(tmp_path):
    cfg = _every_path(tmp_path, ok=True)
    (tmp_path / "judge" / "config.json").unlink()
    (tmp_path / "tok" / "tokenizer.json").unlink()
    cfg.data.train_path = str(tmp_path)  # a directory where a file is expected
    cfg.checkpoint.load_dir = str(tmp_path / "train.jsonl")  # a file where a directory is expected
    problems = path_problems(cfg)
    assert problems == [
        f"data.train_path={tmp_path} is not a file: point it at a JSONL file (or synthetic:<task> for a generated "
        f"CPU set)",
        f"data.tokenizer={tmp_path / 'tok'} has no tokenizer.json: point it at the model's tokenizer.json, its "
        f"directory, or a sentencepiece .model file",
        f"checkpoint.load_dir={tmp_path / 'train.jsonl'} is not a directory: point it at an r1mega checkpoint (its "
        f"root or a step_* directory)",
        f"reward.models[1].path={tmp_path / 'judge'} has no config.json: point it at a Hugging Face model directory "
        f"(config.json + safetensors) serving the judge"]
    no_path = replace(cfg.reward.models[1], path=None)
    cfg.reward = replace(cfg.reward, models=[cfg.reward.models[0], no_path])
    assert path_problems(cfg)[-1] == ("reward.models[1] (judge 'judged') has no path: set it to the HF model "
                                      "directory that serves the judge")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_named(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    data.chmod(0)
    problems = path_problems(R1Config(data=DataConfig(train_path=str(data))))
    assert problems == [f"data.train_path={data} is not readable by this user: fix its permissions or copy it "
                        f"somewhere readable"]


def test_training_needs_a_tokenizer_unless_synthetic_or_distilled(tmp_path):
    synthetic = R1Config(data=DataConfig(train_path="synthetic:addition:2", eval_path="synthetic:addition:2"))
    assert tokenizer_problems(synthetic) == []
    real = replace(synthetic, stages=[StageConfig(name="s", kind="sft", data="data/sft.jsonl")])
    assert tokenizer_problems(real) == [
        "data.tokenizer is not set: point it at the model's tokenizer (tokenizer.json or its directory); only "
        "all-synthetic CPU recipes may leave it unset (this one reads data/sft.jsonl)"]
    distilled = replace(real, stages=[StageConfig(name="d", kind="distill", data="data/p.jsonl")])
    distilled.distill.teacher_hf = "teacher"
    assert tokenizer_problems(distilled) == []
    with pytest.raises(ConfigError, match="data.tokenizer is not set"):
        check_paths(replace(real, stages=[StageConfig(name="s", kind="sft", data="synthetic:addition")],
                            data=DataConfig(train_path="synthetic:addition", eval_path=str(tmp_path / "e.jsonl"))),
                    training=True)
