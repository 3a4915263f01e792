"""The trainer: one object owns a run's parts, and every stage kind is a short function over it.

It holds the tokenizer, the current stage's policy (``TrainingModel``), the rollout engine behind
:class:`~r1mega.train.weight_sync.WeightSync`, the eval set and its judge, the metrics logger and the
:class:`~r1mega.train.resilience.Checkpointer` with the stop signal. ``train/recipe.py`` runs the stages
(``train/stages.py``, ``train/distill.py``) over it; every command that trains (``train``, ``sft``,
``distill``, ``demo``) goes through it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from r1mega.config import R1Config
from r1mega.train.resilience import Checkpointer, StopSignal
from r1mega.train.weight_sync import WeightSync

log = logging.getLogger(__name__)


class Trainer:
    """A run's parts on this rank (the engine, the rewards and the judge on rank 0 only)."""

    def __init__(self, cfg: R1Config, rank: int, world_size: int, stop: StopSignal, role=None):
        from r1mega.train.run_data import run_tokenizer

        self.cfg, self.rank, self.world_size, self.role = cfg, rank, world_size, role
        self.out = Path(cfg.trainer.output_dir)
        if rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self.tokenizer, self.tok_dir = run_tokenizer(cfg, self.out)
        self.ckpt = Checkpointer(cfg, None, self.out / "metrics.jsonl", stop)
        self.sync = WeightSync(cfg, self.out, self.tok_dir, tokenizer=self.tokenizer)
        self.metrics = None  # opened by open_metrics once the resume point has cut metrics.jsonl back
        self.tm = None  # the current stage's TrainingModel
        self.tm_checkpoint: Optional[str] = None  # the checkpoint it was loaded from
        self.eval_set, self.judge = None, None
        self.rejection_output: Optional[str] = None  # the last rejection-sampling stage's SFT data
        self.stages: dict = {}  # name -> done.json contents

    def open_metrics(self, append: bool, run_config: dict) -> None:
        from r1mega.train.metrics import MetricsLogger

        c = self.cfg
        self.metrics = MetricsLogger(self.out, c.logging, rank=self.rank, log_interval=c.trainer.log_interval,
                                     run_config=run_config, append=append)

    def open_eval(self) -> None:
        """The held-out problems of ``data.eval_path`` and their judge (rank 0)."""
        c = self.cfg
        if not c.data.eval_path:
            return
        from r1mega.rewards import RewardComputer
        from r1mega.train.evaluate import judge_config, load_eval_examples, make_problems

        examples = load_eval_examples(c.data.eval_path, c.data.seed, c.eval.max_prompts)
        self.eval_set = make_problems(examples, self.tokenizer, c.data.chat_template, c.data.max_prompt_length)
        if self.rank == 0:
            self.judge = RewardComputer(judge_config(c.reward, {e.data_source for e in examples}))

    # ------------------------------------------------------------------ the policy

    def new_model(self, scfg: R1Config, checkpoint: Optional[str], resume_from: Optional[Path] = None) -> dict:
        """A fresh policy for a stage (new optimizer and LR schedule over its steps), from ``checkpoint``'s
        weights, or the whole training state of ``resume_from`` (mid-stage). Returns the loop state of
        ``resume_from`` (``{}`` without it). Collective."""
        import gc

        from r1mega.train.model_setup import build_training_model
        from r1mega.train.stages import load_weights

        self.tm = None
        gc.collect()
        self.tm = build_training_model(scfg.model, scfg.parallel, scfg.optimizer,
                                       total_steps=max(1, scfg.trainer.steps))
        self.ckpt.tm = self.tm
        self.tm_checkpoint = checkpoint
        self.sync.stale = True
        if resume_from is not None:
            return self.ckpt.load(resume_from)
        if checkpoint:
            load_weights(self.tm, checkpoint, scfg.model)
        return {}

    # ------------------------------------------------------------------ eval

    def evaluate(self, tag: str, step: int = 0, in_step: bool = False) -> dict:
        """Eval on ``data.eval_path`` (collective), logged as a ``stage: eval`` record; ``in_step``: inside a
        GRPO step, after its update (the record shares that step's global step)."""
        if self.eval_set is None:
            return {}
        from r1mega.train.evaluate import eval_sampling, evaluate_collective

        if not in_step:
            self.sync.ensure(self.tm, f"refit before eval {tag}")
        c = self.cfg
        r = evaluate_collective(self.sync.first, self.judge, self.eval_set, c.eval.k, eval_sampling(c, self.tokenizer),
                                self.tokenizer, c.reward.math_timeout_s)
        self.metrics.log({"stage": "eval", "step": step, "when": tag, **r,
                          "global_step": self.metrics.global_step + in_step})
        if self.rank == 0:
            log.info("eval (%s): pass@1 %.3f format %.3f", tag, r["eval/pass@1"], r["eval/format"])
        return r

    def close(self) -> None:
        from r1mega.train.offpolicy import release_engines

        release_engines(self.role)
        self.sync.close()
        if self.judge is not None:
            self.judge.close()
        if self.metrics is not None:
            self.metrics.close()
