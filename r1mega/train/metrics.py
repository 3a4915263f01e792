"""One metrics sink for every loop: ``metrics.jsonl``, TensorBoard, W&B and a progress display (rank 0).

Every record a loop produces goes through ``MetricsLogger.log``: it gets ``stage_name`` (the recipe
stage) and ``global_step`` (optimizer steps over the whole run, so curves of several stages share an
axis), is appended to ``metrics.jsonl`` and, when enabled, written to TensorBoard
(``<out>/tensorboard``; ``logging.tensorboard``: ``null`` = when installed, ``true`` = required) and W&B
(``logging.wandb_project``; ``wandb`` must then be installed). On a TTY a rich progress bar shows
ETA and live reward/KL/eval; otherwise (CI, Slurm logs) one plain line every ``log_interval`` steps.
Which sinks are on is logged once. ``finish`` writes ``summary.json`` and ``curves.png`` (``r1mega.train.plots``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

TRAIN_STAGES = ("sft", "grpo")  # record["stage"] of an optimizer step (others, e.g. "eval", do not count)
LIVE_KEYS = (("reward/mean", "reward"), ("kl", "kl"), ("loss", "loss"), ("response_len/mean", "len"),
             ("entropy", "entropy"), ("grad_norm", "grad_norm"), ("eval/pass@1", "pass@1"))


class SinkError(RuntimeError):
    """A sink the config asks for cannot be used; the message says how to fix it."""


def _tensorboard_writer(log_dir: Path):
    from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

    return SummaryWriter(log_dir=str(log_dir))


def _wandb():
    import wandb

    return wandb


def _scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
            and k not in ("step", "global_step")}


def _fmt(values: dict) -> str:
    return " ".join(f"{short} {values[k]:.3f}" for k, short in LIVE_KEYS if isinstance(values.get(k), (int, float)))


class MetricsLogger:
    """Rank-0 metrics fan-out; on other ranks every method is a no-op (call them on every rank)."""

    def __init__(self, out_dir, logging_cfg=None, *, rank: int = 0, log_interval: int = 1,
                 progress: Optional[bool] = None, console=None, run_config: Optional[dict] = None,
                 append: bool = False):
        self.out_dir = Path(out_dir)
        self.active = rank == 0
        self.log_interval = max(1, log_interval)
        self.path = self.out_dir / "metrics.jsonl"
        self.global_step = 0
        self.stage_name: Optional[str] = None
        self.records: list[dict] = []
        self.t_start = time.monotonic()
        self._tb = self._wandb = self._progress = self._task = None
        self._stage_total = 0
        self._stage_done = 0  # steps of the stage done, earlier attempts (a resumed run) included
        self._steps_here = 0  # steps this process ran: the rate is measured from its first one's end
        self._rate_t0 = 0.0
        self._live: dict = {}  # latest value of each LIVE_KEYS metric in this stage
        if not self.active:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if append and self.path.exists():  # a resumed run: summary and plot cover the earlier records too
            from r1mega.train.plots import read_records

            self.records = read_records(self.path)
            self.global_step = max((r.get("global_step", 0) for r in self.records), default=0)
        else:
            self.path.write_text("")
        tb = getattr(logging_cfg, "tensorboard", None)
        wandb_project = getattr(logging_cfg, "wandb_project", None)
        notes = [f"jsonl {self.path}"]
        if tb is not False:
            try:
                self._tb = _tensorboard_writer(self.out_dir / "tensorboard")
                notes.append(f"tensorboard {self.out_dir / 'tensorboard'}")
            except ImportError as e:
                if tb:
                    raise SinkError(f"logging.tensorboard=true but TensorBoard is unavailable ({e}): "
                                    f"pip install tensorboard, or set logging.tensorboard=null/false") from None
                notes.append("tensorboard off (package not installed; pip install tensorboard)")
        else:
            notes.append("tensorboard off (logging.tensorboard=false)")
        if wandb_project:
            try:
                wandb = _wandb()
            except ImportError:
                raise SinkError(f"logging.wandb_project={wandb_project!r} but wandb is not installed: "
                                f"pip install wandb, or unset logging.wandb_project") from None
            self._wandb = wandb.init(project=wandb_project, dir=str(self.out_dir), config=run_config or {},
                                     name=self.out_dir.name)
            notes.append(f"wandb project {wandb_project}")
        else:
            notes.append("wandb off (logging.wandb_project unset)")
        show = sys.stdout.isatty() if progress is None else progress
        if show:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                      TextColumn("{task.fields[live]}"), console=console or Console(),
                                      transient=False)
            self._progress.start()
            notes.append("progress bar")
        else:
            notes.append(f"progress as log lines every {self.log_interval} steps (stdout is not a TTY)")
        log.info("metrics sinks: %s", "; ".join(notes))

    # ------------------------------------------------------------------ stages and records

    def start_stage(self, name: str, total_steps: int, done: int = 0) -> None:
        """Name the records that follow and (re)start the progress/ETA over the stage's ``total_steps``
        steps, ``done`` of which ran before (a resumed stage)."""
        self.stage_name = name
        self._stage_total, self._stage_done, self._steps_here = total_steps, done, 0
        self._live = {}
        if self._progress is not None:
            if self._task is not None:
                self._progress.stop_task(self._task)
            self._task = self._progress.add_task(name, total=max(total_steps, 1), completed=done, live="")

    def log(self, record: dict) -> dict:
        """Tag, store and fan out one record; returns the tagged record."""
        record = dict(record)
        if record.get("stage") in TRAIN_STAGES:
            self.global_step += 1
            self._stage_done += 1
            self._steps_here += 1
            if self._steps_here == 1:  # start-up and the first step (engine start, compiles) are not the rate
                self._rate_t0 = time.monotonic()
        if self.stage_name is not None:
            record.setdefault("stage_name", self.stage_name)
        record.setdefault("global_step", self.global_step)
        self.records.append(record)
        if not self.active:
            return record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = _scalars(record)
        prefix = record.get("stage", "run")
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"{prefix}/{key}", value, self.global_step)
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=self.global_step)
        self._show(record)
        return record

    def _show(self, record: dict) -> None:
        self._live.update({k: record[k] for k, _ in LIVE_KEYS if k in record})
        live = _fmt(self._live)
        if self._progress is not None and self._task is not None:
            advance = 1 if record.get("stage") in TRAIN_STAGES else 0
            self._progress.update(self._task, advance=advance, live=live)
            return
        step, train = record.get("step", 0), record.get("stage") in TRAIN_STAGES
        if train and step % self.log_interval and step != self._stage_total:
            return
        eta = ""
        if train and self._steps_here >= 2 and self._stage_total:
            per_step = (time.monotonic() - self._rate_t0) / (self._steps_here - 1)
            eta = f" ({per_step:.2f}s/step, ETA {per_step * max(self._stage_total - self._stage_done, 0):.0f}s)"
        total = f"/{self._stage_total}" if self._stage_total else ""
        extra = " ".join(f"{k} {record[k]}" for k in ("when", "kind", "from", "checkpoint", "kept") if k in record)
        log.info("%s %s step %s%s %s%s", self.stage_name or "-", record.get("stage", ""), step, total,
                 " ".join(x for x in (_fmt(record), extra) if x), eta)

    # ------------------------------------------------------------------ end of run

    def finish(self, summary: dict, plot: bool = True) -> dict:
        """Write ``summary.json`` (plus the plot path) and ``curves.png``; close the sinks. Rank 0 only writes."""
        if self.active:
            if plot:
                from r1mega.train.plots import plot_curves

                summary = {**summary, "plot": str(plot_curves(self.records, self.out_dir / "curves.png"))}
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.close()
        return summary

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def run_summary(records: list[dict], seconds: float) -> dict:
    """First/last eval numbers, mean GRPO reward over the first vs last 20% of steps, steps per stage, wall time."""
    out: dict = {"seconds": seconds}
    evals = [r for r in records if r.get("stage") == "eval" and "eval/pass@1" in r]
    for key in ("eval/pass@1", "eval/cons@k", "eval/format", "eval/response_len"):
        values = [r[key] for r in evals if key in r]
        if values:
            out[f"{key}_first"], out[f"{key}_last"] = values[0], values[-1]
    grpo = [r for r in records if r.get("stage") == "grpo" and "reward/mean" in r]
    if grpo:
        fifth = max(1, len(grpo) // 5)
        out["grpo/reward_first_20pct"] = sum(r["reward/mean"] for r in grpo[:fifth]) / fifth
        out["grpo/reward_last_20pct"] = sum(r["reward/mean"] for r in grpo[-fifth:]) / fifth
    steps: dict[str, int] = {}
    for r in records:
        if r.get("stage") in TRAIN_STAGES:
            name = r.get("stage_name") or r["stage"]
            steps[name] = steps.get(name, 0) + 1
    out["steps"] = steps
    return out
