"""MetricsLogger: metrics.jsonl, TensorBoard, progress display, summary.json and curves.png, and its errors."""

from __future__ import annotations

import io
import json
import logging

import pytest

from r1mega.config.schema import LoggingConfig
from r1mega.train import metrics as metrics_mod
from r1mega.train.metrics import MetricsLogger, SinkError, run_summary


def _run(logger: MetricsLogger, grpo_steps: int = 10) -> None:
    logger.start_stage("cold_start_sft", 3)
    logger.log({"stage": "eval", "step": 0, "eval/pass@1": 0.0, "eval/cons@k": 0.0, "eval/format": 0.0})
    for s in range(1, 4):
        logger.log({"stage": "sft", "step": s, "loss": 3.0 - s})
    logger.start_stage("reasoning_rl", grpo_steps)
    for s in range(1, grpo_steps + 1):
        logger.log({"stage": "grpo", "step": s, "reward/mean": s / 10, "kl": 0.01 * s, "response_len/mean": 20 + s,
                    "skipped": False})
    logger.log({"stage": "eval", "step": grpo_steps, "eval/pass@1": 0.5, "eval/cons@k": 0.75, "eval/format": 0.9})


def test_jsonl_tensorboard_summary_and_png(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    caplog.set_level(logging.INFO, logger="r1mega.train.metrics")
    logger = MetricsLogger(tmp_path, LoggingConfig(), progress=False, log_interval=5)
    assert "tensorboard" in caplog.text and "wandb off" in caplog.text  # which sinks are on, said once
    _run(logger)
    summary = logger.finish(run_summary(logger.records, seconds=12.5))

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 15
    assert [r["global_step"] for r in lines if r["stage"] != "eval"] == list(range(1, 14))
    assert {r["stage_name"] for r in lines[:4]} == {"cold_start_sft"} and lines[-1]["stage_name"] == "reasoning_rl"
    assert lines[-1]["global_step"] == 13
    assert "reasoning_rl grpo step 5/10" in caplog.text and "ETA" in caplog.text  # plain progress lines

    disk = json.loads((tmp_path / "summary.json").read_text())
    assert disk == summary
    assert summary["eval/pass@1_first"] == 0.0 and summary["eval/pass@1_last"] == 0.5
    assert summary["eval/cons@k_last"] == 0.75 and summary["eval/format_last"] == 0.9
    assert summary["grpo/reward_first_20pct"] == pytest.approx((0.1 + 0.2) / 2)  # 20% of 10 steps = 2
    assert summary["grpo/reward_last_20pct"] == pytest.approx((0.9 + 1.0) / 2)
    assert summary["steps"] == {"cold_start_sft": 3, "reasoning_rl": 10} and summary["seconds"] == 12.5

    png = tmp_path / "curves.png"
    assert summary["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape == (700, 1000, 4)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    reward = acc.Scalars("grpo/reward/mean")
    assert [e.step for e in reward] == list(range(4, 14))
    assert reward[-1].value == pytest.approx(1.0)
    assert [e.value for e in acc.Scalars("eval/eval/pass@1")] == [0.0, 0.5]


def test_progress_bar_shows_stage_eta_and_live_values(tmp_path):
    from rich.console import Console

    buf = io.StringIO()
    logger = MetricsLogger(tmp_path, LoggingConfig(tensorboard=False), progress=True,
                           console=Console(file=buf, force_terminal=True, width=160))
    _run(logger, grpo_steps=4)
    logger.close()
    text = buf.getvalue()
    assert "reasoning_rl" in text and "ETA" in text and "4/4" in text
    assert "reward 0.400" in text and "kl 0.040" in text


def test_only_rank0_writes(tmp_path):
    logger = MetricsLogger(tmp_path / "r1", LoggingConfig(), rank=1, progress=False)
    _run(logger)
    assert logger.records[-1]["global_step"] == 13  # still counts (every rank returns the same records)
    logger.finish({"x": 1})
    assert not (tmp_path / "r1").exists()


def test_requested_sinks_that_cannot_work_fail_with_the_fix(tmp_path, monkeypatch):
    def missing(*_):
        raise ImportError("No module named 'tensorboard'")

    monkeypatch.setattr(metrics_mod, "_tensorboard_writer", missing)
    with pytest.raises(SinkError, match="pip install tensorboard"):
        MetricsLogger(tmp_path, LoggingConfig(tensorboard=True), progress=False)
    MetricsLogger(tmp_path, LoggingConfig(tensorboard=None), progress=False).close()  # optional: off, logged
    monkeypatch.setattr(metrics_mod, "_wandb", missing)
    with pytest.raises(SinkError, match="pip install wandb"):
        MetricsLogger(tmp_path, LoggingConfig(tensorboard=False, wandb_project="r1"), progress=False)


def test_append_keeps_earlier_records_for_the_summary(tmp_path):
    first = MetricsLogger(tmp_path, LoggingConfig(tensorboard=False), progress=False)
    _run(first)
    first.close()
    again = MetricsLogger(tmp_path, LoggingConfig(tensorboard=False), progress=False, append=True)
    assert again.global_step == 13 and len(again.records) == 15
    again.start_stage("more_rl", 1)
    again.log({"stage": "grpo", "step": 1, "reward/mean": 2.0})
    again.close()
    assert run_summary(again.records, 1.0)["steps"] == {"cold_start_sft": 3, "reasoning_rl": 10, "more_rl": 1}
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["global_step"] == 14


def test_resumed_stage_counts_to_its_total_and_the_eta_skips_start_up(tmp_path, caplog, monkeypatch):
    """A stage resumed after 6 of 10 steps reads 7/10 .. 10/10; the rate is that of steps 2.. of this run
    (1 s each), not start-up plus the first step (100 s)."""
    clock = iter([0.0, 100.0, 101.0, 102.0, 103.0])  # the logger starts, then each step ends
    monkeypatch.setattr(metrics_mod.time, "monotonic", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="r1mega.train.metrics")
    logger = MetricsLogger(tmp_path, LoggingConfig(tensorboard=False), progress=False)
    logger.start_stage("reasoning_rl", 10, done=6)
    for s in range(7, 11):
        logger.log({"stage": "grpo", "step": s, "reward/mean": 0.5})
    logger.close()
    lines = [r.getMessage() for r in caplog.records if "reasoning_rl grpo step" in r.getMessage()]
    assert [line.split()[3] for line in lines] == ["7/10", "8/10", "9/10", "10/10"]
    assert "ETA" not in lines[0]  # one step of this run: no rate yet
    assert lines[1].endswith("(1.00s/step, ETA 2s)") and lines[2].endswith("(1.00s/step, ETA 1s)")
    assert lines[3].endswith("(1.00s/step, ETA 0s)")
