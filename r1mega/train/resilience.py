"""Reliability of the training loops: stop signals, periodic atomic checkpoints, exact resume.

* :class:`StopSignal` turns SIGTERM / SIGUSR1 (Slurm's pre-time-limit signal, forwarded as SIGTERM by
  ``launch/slurm.py``) into a flag. The loops read it only at step boundaries, through an all-reduce,
  so every rank stops after the same step (a rank that stopped alone would hang the others).
* :class:`Checkpointer` saves with :func:`r1mega.ckpt.save_checkpoint` (atomic commit) every
  ``checkpoint.save_interval`` optimizer steps and when a stop was agreed, then raises
  :class:`TrainingPreempted`; the CLI turns that into exit code :data:`EXIT_PREEMPTED`. Checkpoint
  directories are numbered by the run's global optimizer step (all stages counted); ``extra`` holds
  the stage, the step within it and whatever the loop needs to continue bit-identically (data
  position, sampler state, counters, the number of ``metrics.jsonl`` lines written so far).
* ``checkpoint.resume=auto`` picks the latest complete checkpoint in the save directory, so a
  requeued job continues by itself.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from r1mega.platform.distributed import broadcast_from_rank0

log = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry" - stopped by a signal after
# writing a checkpoint; rerunning the same command (or a requeued Slurm job) resumes from it.
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingPreempted(Exception):
    """Raised on every rank after the checkpoint that follows an agreed stop signal was written."""

    def __init__(self, signal_name: str, step: int, path: Path):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {path}. "
                         "Run the same command again to resume from it (checkpoint.resume=auto)")
        self.signal_name, self.step, self.path = signal_name, step, path


class StopSignal:
    """Context manager: SIGTERM/SIGUSR1 set a flag instead of killing the process.

    :meth:`agreed` (collective) is true on every rank once any rank received a signal.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            log.warning("received %s: finishing the current step, then checkpoint and exit",
                        signal.Signals(signum).name)
        self.received = signum

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopSignal must be entered on the main thread (Python delivers signals there)")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def agreed(self) -> Optional[str]:
        """Collective: the name of a signal some rank received (the lowest number wins), else ``None``."""
        local = self.received or 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([local if local else 1 << 30], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            local = int(flag.item()) if int(flag.item()) != 1 << 30 else 0
        return signal.Signals(local).name if local else None


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(1 for _ in f)


class Checkpointer:
    """When to save, what to put in ``extra``, where to resume from (one object per run, every rank).

    ``global_step`` counts optimizer steps over all stages; the loops call :meth:`end_of_step` after each.
    """

    def __init__(self, cfg, tm, metrics_path: Path, stop: Optional[StopSignal] = None):
        ck = cfg.checkpoint
        self.root = Path(ck.save_dir) if ck.save_dir else Path(cfg.trainer.output_dir) / "checkpoints"
        self.interval, self.keep_last, self.resume = ck.save_interval, ck.keep_last, ck.resume
        self.tm, self.model_cfg, self.metrics_path, self.stop = tm, cfg.model, Path(metrics_path), stop
        self.global_step = 0
        self.run_state: dict = {}  # run-level values (e.g. eval results of finished stages), saved in extra
        self.last_saved: Optional[int] = None

    # ------------------------------------------------------------------ resume

    def resume_path(self) -> Optional[Path]:
        """The checkpoint this run continues from (``checkpoint.resume``), or ``None`` to start afresh."""
        from r1mega.ckpt import committed_steps, resolve_checkpoint_dir

        if self.resume == "none":
            return None
        if self.resume != "auto":
            return resolve_checkpoint_dir(self.resume)  # raises with the path and the fix
        if not committed_steps(self.root):
            return None
        return resolve_checkpoint_dir(self.root)

    @staticmethod
    def loop_state(path: Path) -> dict:
        """The loop state a training loop saved in checkpoint ``path`` (read from its meta; nothing loaded)."""
        from r1mega.ckpt import read_meta

        extra = read_meta(path).get("extra", {})
        missing = [k for k in ("stage", "stage_step", "metrics_lines") if k not in extra]
        if missing:
            raise ValueError(f"checkpoint {path} lacks the loop state {missing} (not written by an r1mega training "
                             "loop?): resume from a checkpoint of this run, or set checkpoint.resume=none")
        return extra

    def load(self, path: Path) -> dict:
        """Collective: restore model, optimizer, scheduler, RNG; returns the loop state saved in ``extra``.

        The scheduler takes the checkpoint's learning rates. The caller has cut ``metrics.jsonl`` back to
        the checkpoint's ``metrics_lines`` (:func:`cut_metrics`): the steps after it run again.
        """
        from r1mega.ckpt import CheckpointError, committed_steps, load_checkpoint

        self.tm.scheduler.use_checkpoint_opt_param_scheduler = True
        try:
            info = load_checkpoint(self.tm, path, model_cfg=self.model_cfg)
        except (CheckpointError, KeyboardInterrupt, SystemExit):
            raise  # ours already name the path and the fix
        except BaseException as e:  # noqa: B036 - damaged shards: torch's CheckpointException is a BaseException
            older = [str(p) for _, p in committed_steps(Path(path).parent) if Path(p).name < Path(path).name]
            hint = (f"resume from the previous one with checkpoint.resume={older[-1]}" if older else
                    "start afresh with checkpoint.resume=none")
            lines = str(e).strip().splitlines() or [""]
            why = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"  # torch embeds a traceback
            raise CheckpointError(f"could not load checkpoint {path} ({type(e).__name__}: {why}); it is damaged "
                                  f"or from an incompatible run: {hint}, or delete {path}") from e
        finally:
            self.tm.scheduler.use_checkpoint_opt_param_scheduler = False
        extra = info["extra"]
        self.global_step = info["step"]
        self.last_saved = info["step"]
        self.run_state = dict(extra.get("run_state", {}))
        log.info("resuming from %s: global step %d, stage %s step %d", info["path"], info["step"], extra["stage"],
                 extra["stage_step"])
        return extra

    # ------------------------------------------------------------------ save

    def save(self, stage: str, stage_step: int, state: dict) -> Path:
        """Collective: an atomic checkpoint of the current global step."""
        from r1mega.ckpt import save_checkpoint
        from r1mega.train.memory import onload

        onload(self.tm)  # the optimizer state must be on the device (or this is a no-op) to be saved

        lines = broadcast_from_rank0(_count_lines(self.metrics_path) if not dist.is_initialized()
                                     or dist.get_rank() == 0 else None)
        extra = {"stage": stage, "stage_step": int(stage_step), "metrics_lines": lines,
                 "run_state": self.run_state, **state}
        path = save_checkpoint(self.tm, self.root, self.global_step, extra, keep_last=self.keep_last,
                               model_cfg=self.model_cfg, protect=self.stage_checkpoints())
        self.last_saved = self.global_step
        return path

    def stage_checkpoints(self) -> tuple[Path, ...]:
        """The checkpoints finished stages' done.json name (pruning keeps them: later stages start there)."""
        named = []
        for done in sorted(self.metrics_path.parent.glob("*/done.json")):
            checkpoint = json.loads(done.read_text()).get("checkpoint")
            if checkpoint:
                named.append(Path(checkpoint))
        return tuple(named)

    def final_checkpoint(self, stage_root: Path, stage_steps: int) -> Path:
        """Collective, at the end of a stage: its final checkpoint ``<stage_root>/step_<stage_steps>``.

        Written once: when the periodic save already wrote this exact state (the stage's last step was a
        save step) the stage's name hard-links that checkpoint's files instead of saving them again."""
        from r1mega.ckpt import link_checkpoint, save_checkpoint
        from r1mega.ckpt.atomic import step_dir_name

        periodic = self.root / step_dir_name(self.global_step)
        if self.last_saved == self.global_step and periodic.is_dir():
            return link_checkpoint(periodic, stage_root, stage_steps, keep_last=1)
        return save_checkpoint(self.tm, stage_root, stage_steps, extra={"stage": stage_root.name}, keep_last=1,
                               model_cfg=self.model_cfg)

    def end_of_step(self, stage: str, stage_step: int, state: dict) -> None:
        """Collective, after every optimizer step: save periodically, and save + raise on a stop signal."""
        self.global_step += 1
        stop = self.stop.agreed() if self.stop is not None else None
        if stop or (self.interval and self.global_step % self.interval == 0):
            path = self.save(stage, stage_step, state)
            if stop:
                raise TrainingPreempted(stop, self.global_step, path)


def cut_metrics(path: Path, lines: int) -> None:
    """Rank 0, before a resumed run logs anything: keep the first ``lines`` lines of ``metrics.jsonl``."""
    path = Path(path)
    have = path.read_text().splitlines(keepends=True) if path.exists() else []
    if len(have) < lines:
        log.warning("%s has %d lines, the checkpoint expected at least %d: metrics of earlier steps are missing "
                    "there", path, len(have), lines)
    if path.exists() or lines:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(have[:lines]))


def check_skip(m, stage: str, step: int, skip_nonfinite: bool) -> int:
    """1 if the learner skipped this step (non-finite loss or gradients), else 0.

    With ``trainer.skip_nonfinite_loss=false`` a skipped step is an error instead (nothing was applied).
    """
    if not m.skipped:
        return 0
    loss = m.values.get("loss", float("nan"))
    if not skip_nonfinite:
        raise FloatingPointError(f"{stage} step {step}: non-finite loss ({loss}) or gradients (norm {m.grad_norm}); "
                                 "the update was not applied. Set trainer.skip_nonfinite_loss=true to skip such "
                                 "steps and count them (metric skipped_steps)")
    log.warning("%s step %d: non-finite loss (%s) or gradients (norm %s): optimizer step skipped", stage, step,
                loss, m.grad_norm)
    return 1
