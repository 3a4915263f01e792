"""``r1mega train``: run a recipe's ``stages`` in order (DeepSeek-R1 §2.3), resumable at any step.

R1: cold-start SFT -> reasoning RL (GRPO) -> rejection sampling -> SFT -> all-scenario RL. R1-Zero:
one GRPO stage straight from the base model. Each SFT/GRPO/distill stage builds a fresh policy (new
optimizer and LR schedule over its own steps) from the previous stage's final checkpoint (the first
stage: ``checkpoint.load_dir``, else a seeded fresh init), trains, and saves
``<checkpoint root>/<stage>/step_<n>`` (once: hard links to the periodic checkpoint when one was saved at
that step). A finished stage leaves ``<output_dir>/<stage>/done.json``.

Resume: every ``checkpoint.save_interval`` optimizer steps, and after the step in which SIGTERM or
SIGUSR1 arrived (then exit 75), the trainer saves the whole training state to
``<checkpoint root>/step_<global step>``. Running the same command again (``checkpoint.resume=auto``)
skips the finished stages, continues the interrupted one from its latest checkpoint, and cuts
``metrics.jsonl`` back to what that checkpoint had seen, so the run's metrics equal an uninterrupted
run's.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

from r1mega.config import R1Config, StageConfig, check_stage_list, save_config, stage_config

log = logging.getLogger(__name__)


def _runners() -> dict:
    from r1mega.train.distill import distill_stage
    from r1mega.train.stages import grpo_stage, rejection_stage, sft_stage

    return {"sft": sft_stage, "grpo": grpo_stage, "rejection_sampling": rejection_stage, "distill": distill_stage}


def run_recipe(cfg: R1Config, only: Optional[list[StageConfig]] = None) -> Optional[dict]:
    """Run every stage (or ``only`` these); every rank calls this. Returns the summary (``summary.json``);
    ``None`` on an engine rank of a one-step-off run. Raises ``TrainingPreempted`` after a stop signal."""
    if only is not None:
        cfg = replace(cfg, stages=list(only))
    check_stage_list(cfg)
    from r1mega.train.resilience import StopSignal
    from r1mega.train.weight_sync import start_engine_ahead

    with StopSignal() as stop:  # installed first: start-up takes a while, and a signal then must not be lost
        start_engine_ahead(cfg)  # before megatron's import: the engine child imports vLLM meanwhile
        try:
            return _start(cfg, stop)
        finally:
            from r1mega.rollout.vllm_engine import discard_spares

            discard_spares()  # an engine child started ahead that nothing adopted


def _start(cfg: R1Config, stop) -> Optional[dict]:
    """The process group and megatron's parallel state around the stages (or this rank's engine service)."""
    from r1mega.models.policy import padded_vocab_size  # noqa: F401  (readies megatron)
    from r1mega.platform.distributed import init_model_parallel, init_process_group, launch_env, shutdown
    from r1mega.platform.gc_freeze import freeze_imported_objects

    freeze_imported_objects()  # megatron and torch are in: later full collections skip their objects

    role = None
    if cfg.rollout.mode == "one_step_off":
        from r1mega.platform.disaggregated import split_world

        world = launch_env()
        role = split_world(cfg.rollout.engine_ranks, timeout_minutes=cfg.parallel.timeout_minutes, env=world)
        if not role.is_learner:
            from r1mega.rollout import engine_env
            from r1mega.train.offpolicy import serve_engine

            out = Path(cfg.trainer.output_dir)
            serve_engine(cfg, role, engine_env=engine_env(out, cfg.rollout))
            return None
    else:
        init_process_group(timeout_minutes=cfg.parallel.timeout_minutes)
    init_model_parallel(cfg.parallel, seed=cfg.model.seed)
    try:
        return _run(cfg, stop, role)
    finally:
        shutdown()


def _done_path(out: Path, stage: StageConfig) -> Path:
    return out / stage.name / "done.json"


def _resume_point(tr, cfg: R1Config, done: dict) -> tuple[Optional[Path], Optional[dict], int, int]:
    """``(checkpoint to resume, its loop state, metrics lines to keep, global step)``.

    The latest mid-stage checkpoint counts only if its stage has not finished since; otherwise the run
    continues after the last finished stage (its done.json says how many metrics lines and steps)."""
    last_done = [done[s.name] for s in cfg.stages if s.name in done]
    lines = last_done[-1].get("metrics_lines", 0) if last_done else 0
    global_step = last_done[-1].get("global_step", 0) if last_done else 0
    path = tr.ckpt.resume_path()
    if path is None:
        return None, None, lines, global_step
    extra = tr.ckpt.loop_state(path)
    if extra.get("stage") in done or extra.get("stage") not in {s.name for s in cfg.stages}:
        return None, None, lines, global_step
    return path, extra, extra["metrics_lines"], None


def _run(cfg: R1Config, stop, role) -> dict:
    import torch.distributed as dist

    from r1mega.platform.writer_queue import start_writer_queue
    from r1mega.train.metrics import run_summary
    from r1mega.train.resilience import cut_metrics
    from r1mega.train.stages import weights_fingerprint
    from r1mega.train.trainer import Trainer

    t_start = time.monotonic()
    rank, world = dist.get_rank(), dist.get_world_size()
    tr = Trainer(cfg, rank, world, stop, role)
    out, stage_roots = tr.out, tr.ckpt.root
    if rank == 0:
        save_config(cfg, out / "config.yaml")
    done = {s.name: json.loads(_done_path(out, s).read_text()) for s in cfg.stages if _done_path(out, s).exists()}
    resume_path, resume, keep_lines, global_step = _resume_point(tr, cfg, done)
    if any(s.name not in done for s in cfg.stages):  # a stage to run saves: its writer is ready by then
        start_writer_queue()
    if rank == 0:
        cut_metrics(out / "metrics.jsonl", keep_lines)
    dist.barrier()
    tr.open_metrics(append=keep_lines > 0, run_config=asdict(cfg))
    tr.open_eval()
    if global_step is not None:
        tr.ckpt.global_step = global_step
    checkpoint = cfg.checkpoint.load_dir
    if not checkpoint and rank == 0 and not done and resume is None:
        log.warning("checkpoint.load_dir is not set: the first stage starts from a fresh seeded init (fine for "
                    "CPU recipes; for a real base model run `r1mega convert from-hf` and set checkpoint.load_dir)")
    fresh = not done and resume is None
    try:
        for i, stage in enumerate(cfg.stages):
            if stage.name in done:
                info = done[stage.name]
                checkpoint = info.get("checkpoint") or checkpoint
                tr.rejection_output = info.get("sft_data") or tr.rejection_output
                tr.stages[stage.name] = info
                if rank == 0:
                    log.info("stage %s already done (%s): skipped", stage.name, _done_path(out, stage))
                continue
            scfg = stage_config(cfg, stage, role.world.world_size if role is not None else world)  # the launcher's
            steps = scfg.trainer.steps if stage.kind != "rejection_sampling" else 0
            mine = resume if resume is not None and resume["stage"] == stage.name else None
            if mine is None and (stage.kind != "rejection_sampling" or tr.tm is None or tr.tm_checkpoint != checkpoint):
                tr.new_model(scfg, checkpoint)
            if mine is not None:  # the periodic checkpoint's whole training state, mid-stage
                # the loop state as saved (meta.json's copy is JSON-able only: an SFT sampler state is a tensor)
                mine = tr.new_model(scfg, checkpoint, resume_from=resume_path)
                tr.metrics.start_stage(stage.name, steps, done=mine["stage_step"])
                start = mine["run_state"]["fingerprint_start"]
            else:
                tr.metrics.start_stage(stage.name, steps)
                start = weights_fingerprint(tr.tm)
                tr.metrics.log({"stage": "stage_start", "step": 0, "kind": stage.kind, "from": checkpoint or "init",
                                "weights_fingerprint": start})
                if fresh and i == 0:
                    tr.evaluate(f"before_{stage.name}")  # the starting point, once
            tr.ckpt.run_state = {"fingerprint_start": start}
            t0 = time.monotonic()
            info = {"kind": stage.kind, "from": checkpoint, "fingerprint_start": start,
                    **_runners()[stage.kind](tr, stage, scfg, mine)}
            if stage.kind != "rejection_sampling":
                path = tr.ckpt.final_checkpoint(stage_roots / stage.name, steps)
                checkpoint = tr.tm_checkpoint = str(path)
            info.update({"checkpoint": checkpoint, "fingerprint_end": weights_fingerprint(tr.tm), "steps": steps})
            tr.metrics.log({"stage": "stage_end", "step": steps, "kind": stage.kind, "checkpoint": checkpoint,
                            "weights_fingerprint": info["fingerprint_end"]})
            if stage.kind != "rejection_sampling":
                info.update(tr.evaluate(f"after_{stage.name}", steps))
            info.update({"seconds": time.monotonic() - t0, "global_step": tr.ckpt.global_step,
                         "metrics_lines": len(tr.metrics.records)})
            tr.stages[stage.name] = info
            resume = None
            if rank == 0:
                _done_path(out, stage).parent.mkdir(parents=True, exist_ok=True)
                _done_path(out, stage).write_text(json.dumps(info, indent=2))
        summary = {**run_summary(tr.metrics.records, time.monotonic() - t_start), "world_size": world,
                   "final_checkpoint": checkpoint, "stages": tr.stages,
                   "evals": {r["when"]: r["eval/pass@1"] for r in tr.metrics.records
                             if r.get("stage") == "eval" and "eval/pass@1" in r and r["when"].startswith(("before_",
                                                                                                          "after_"))},
                   "resumed_from": str(resume_path) if resume_path is not None else None}
        return tr.metrics.finish(summary)
    finally:
        tr.close()
