"""``r1mega train``: run a recipe's ``stages`` in order (DeepSeek-R1 §2.3).

R1: cold-start SFT -> reasoning RL (GRPO) -> rejection sampling -> SFT -> all-scenario RL. R1-Zero:
one GRPO stage straight from the base model. Each SFT/GRPO stage builds a fresh ``TrainingModel``
(new optimizer and LR schedule over its own steps), loads the previous stage's final checkpoint
(the first stage: ``checkpoint.load_dir``, else a seeded fresh init), trains, and saves
``<checkpoint.save_dir or output_dir/checkpoints>/<stage>/step_<n>``. A rejection-sampling stage
samples the current policy, keeps the correct, well-formatted generations and writes them as the
next SFT stage's data (``<output_dir>/<stage>/sft.jsonl``). A distill stage does the same with a
different teacher model and trains this stage's (student) model on the result (``train/distill.py``).
A finished stage leaves ``<output_dir>/<stage>/done.json``; running the recipe again skips it.

The rollout engine (rank 0, a child process) starts once, from an HF export, the first time a stage
or an eval needs it, and is refit from the trainer whenever the weights changed.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from r1mega.config import ConfigError, R1Config, StageConfig, check_stage_list, save_config, stage_config
from r1mega.data.tasks import is_synthetic, synthetic_examples

log = logging.getLogger(__name__)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@dataclass
class Recipe:
    """State shared by the stages of one run."""

    cfg: R1Config
    out: Path
    tokenizer: object
    tok_dir: Path
    metrics: object
    engine: object = None  # rank 0 only
    engine_started: bool = False  # every rank (the export that starts/refits it is collective)
    engine_stale: bool = False
    eval_set: Optional[list] = None
    judge: object = None
    rejection_output: Optional[str] = None
    stages: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ engine and eval

    def sync_engine(self, tm) -> None:
        """Start the engine from the trainer's weights, or refit it if they changed (collective)."""
        from r1mega.train.grpo import refit

        if not self.engine_started:
            from r1mega.bridge.hf_dir import save_hf

            hf_dir = self.out / "hf_engine"
            save_hf(tm.module, tm.config, self.cfg.model, hf_dir, tokenizer_dir=self.tok_dir)
            if _rank() == 0:
                from r1mega.rollout import build_engine

                self.engine = build_engine(hf_dir, self.cfg.rollout, in_process=False,
                                           env={"VLLM_CACHE_ROOT": str(self.out / "vllm-cache"),
                                                "OMP_NUM_THREADS": "1"})
            self.engine_started = True
        elif self.engine_stale:
            refit(self.engine, tm, self.cfg.model, int(self.cfg.rollout.refit_bucket_mb * 2**20))
        self.engine_stale = False

    def evaluate(self, tm, tag: str, step: int = 0, in_grpo: bool = False) -> dict:
        """Eval on ``data.eval_path`` (collective); logged as a ``stage: eval`` record."""
        if self.eval_set is None:
            return {}
        from r1mega.train.evaluate import eval_sampling, evaluate_collective

        if not in_grpo:
            self.sync_engine(tm)
        cfg = self.cfg
        r = evaluate_collective(self.engine, self.judge, self.eval_set, cfg.eval.k,
                                eval_sampling(cfg, self.tokenizer), self.tokenizer, cfg.reward.math_timeout_s)
        self.metrics.log({"stage": "eval", "step": step, "when": tag, **r,
                          "global_step": self.metrics.global_step + in_grpo})
        return r

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.judge is not None:
            self.judge.close()
        self.metrics.close()


# ---------------------------------------------------------------------- data


def stage_examples(spec: str, seed: int, need_reference: bool = True):
    from r1mega.data.dataset import load_examples

    return synthetic_examples(spec, "train", seed) if is_synthetic(spec) else load_examples(spec, need_reference)


def recipe_tokenizer(cfg: R1Config, out: Path):
    """``data.tokenizer``; for all-synthetic CPU recipes without one, the demo's BPE trained on the task."""
    from r1mega.config.paths import tokenizer_problems
    from r1mega.data.tokenizer import HFTokenizer, load_tokenizer

    teacher_hf = cfg.distill.teacher_hf if any(s.kind == "distill" for s in cfg.stages) else None
    if cfg.data.tokenizer or teacher_hf:  # a distilled student uses its teacher's tokenizer
        tok_path = Path(cfg.data.tokenizer or teacher_hf)
        return load_tokenizer(tok_path), (tok_path if tok_path.is_dir() else tok_path.parent)
    specs = [s.data for s in cfg.stages if s.data] + [p for p in (cfg.data.train_path, cfg.data.eval_path) if p]
    if problems := tokenizer_problems(cfg):
        raise ConfigError(problems)
    tok_dir = out / "tokenizer"
    if _rank() == 0:
        from r1mega.train.r1_demo import build_tokenizer

        build_tokenizer(tok_dir, stage_examples(specs[0], cfg.data.seed), cfg.model.vocab_size)
    if dist.is_initialized():
        dist.barrier()
    tok = HFTokenizer(tok_dir)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}: "
                          f"raise model.vocab_size")
    return tok, tok_dir


# ---------------------------------------------------------------------- stages


def _sft(r: Recipe, stage: StageConfig, scfg: R1Config, tm) -> dict:
    from r1mega.data.dataset import Example
    from r1mega.data.jsonl import DataError
    from r1mega.train.sft import build_rows, chat_pair, rows_from_pairs, run_sft

    spec = stage.data or r.rejection_output or scfg.data.train_path
    multiple, seq = scfg.parallel.tp, scfg.model.seq_length
    if is_synthetic(spec):
        rows = build_rows(stage_examples(spec, scfg.data.seed), r.tokenizer, seq, scfg.data.chat_template, multiple)
    else:
        pairs = []
        for e in stage_examples(spec, scfg.data.seed, need_reference=False):
            e: Example
            try:
                pairs.append(chat_pair(e.chat(), scfg.data.chat_template))
            except ValueError as exc:
                raise DataError(e.where, None, str(exc)) from None
        rows = rows_from_pairs(pairs, r.tokenizer, seq, multiple)
    run_sft(tm, rows, steps=scfg.trainer.steps, global_batch_size=scfg.trainer.global_batch_size,
            micro_batch_size=scfg.parallel.micro_batch_size, valid_vocab=scfg.model.vocab_size,
            seed=scfg.data.seed, on_step=r.metrics.log)
    r.engine_stale = True
    return {"data": spec, "examples": int(rows.tokens.size(0))}


def _grpo(r: Recipe, stage: StageConfig, scfg: R1Config, tm) -> dict:
    from r1mega.train.evaluate import make_problems
    from r1mega.train.grpo import Prompt, run_grpo
    from r1mega.train.rewarders import TrainingRewarder

    spec = stage.data or scfg.data.train_path
    problems = make_problems(stage_examples(spec, scfg.data.seed), r.tokenizer, scfg.data.chat_template,
                             scfg.data.max_prompt_length)
    prompts = [Prompt.of(p.example, p.text, p.ids) for p in problems]
    r.sync_engine(tm)
    rewarder = TrainingRewarder(scfg.reward, scfg.rollout.max_new_tokens) if _rank() == 0 else None
    try:
        run_grpo(scfg, tm, r.engine, r.tokenizer, prompts, steps=scfg.trainer.steps,
                 prompts_per_step=max(1, scfg.trainer.global_batch_size // scfg.rollout.n), out_dir=r.out,
                 rewarder=rewarder, metrics=r.metrics,
                 evaluate=lambda step: r.evaluate(tm, f"{stage.name}", step, in_grpo=True))
    finally:
        if rewarder is not None:
            rewarder.close()
    return {"data": spec, "prompts": len(prompts)}


def stage_problems(r: Recipe, stage: StageConfig, scfg: R1Config):
    """The stage's prompts (the first ``max_prompts``) rendered and tokenized as the engine sees them."""
    from r1mega.train.evaluate import make_problems

    examples = stage_examples(stage.data or scfg.data.train_path, scfg.data.seed)
    examples = examples[: stage.max_prompts] if stage.max_prompts else examples
    return make_problems(examples, r.tokenizer, scfg.data.chat_template, scfg.data.max_prompt_length)


def filter_to_sft(r: Recipe, stage: StageConfig, scfg: R1Config, groups, path: Path, who: str = "the policy",
                  max_response_tokens: int = 0) -> dict:
    """Rejection-sample ``groups()`` (rank 0 only calls it) into the SFT JSONL ``path``; collective.

    Shared by rejection sampling (the policy's own generations) and distillation (the teacher's). Logs
    the report and refuses an empty result with what to change.
    """
    from r1mega.data.templates import get_template
    from r1mega.platform.distributed import broadcast_from_rank0
    from r1mega.rewards.rejection import rejection_sample

    report = None
    if _rank() == 0:
        report = rejection_sample(groups(), path, reward_cfg=scfg.reward, max_per_prompt=stage.max_per_prompt,
                                  min_language=stage.min_language, max_response_tokens=max_response_tokens,
                                  response_prefix=get_template(scfg.data.chat_template).generation_prefix).as_dict()
    report = broadcast_from_rank0(report)
    r.metrics.log({"stage": "rejection_sampling", "step": 0, "prompts": report["prompts"],
                   "generations": report["generations"], "kept": report["kept"],
                   **{f"dropped/{k}": v for k, v in report["dropped"].items()}})
    if report["kept"] == 0:
        raise RuntimeError(f"stage {stage.name!r}: rejection sampling kept 0 of {report['generations']} generations "
                           f"({report['dropped']}): raise samples_per_prompt, lower min_language, or train "
                           f"{who} longer before this stage")
    return report


def _rejection(r: Recipe, stage: StageConfig, scfg: R1Config, tm) -> dict:
    from r1mega.rollout import SamplingSpec

    problems = stage_problems(r, stage, scfg)
    r.sync_engine(tm)
    path = r.out / stage.name / "sft.jsonl"

    def groups():
        tok = r.tokenizer
        sampling = SamplingSpec.from_config(scfg.rollout, stop_token_ids=[tok.eos_id])
        rows = r.engine.generate([p.ids for p in problems], stage.samples_per_prompt, sampling)
        return [(p.example, [tok.decode([t for t in g.token_ids if t != tok.eos_id]) for g in row])
                for p, row in zip(problems, rows)]

    report = filter_to_sft(r, stage, scfg, groups, path)
    r.rejection_output = str(path)
    return {"data": stage.data or scfg.data.train_path, "sft_data": str(path), "report": report}


def _distill(r: Recipe, stage: StageConfig, scfg: R1Config, tm) -> dict:
    from r1mega.train.distill import run_distill

    return run_distill(r, stage, scfg, tm)


RUNNERS = {"sft": _sft, "grpo": _grpo, "rejection_sampling": _rejection, "distill": _distill}


# ---------------------------------------------------------------------- the run


def _fresh_model(scfg: R1Config, checkpoint: Optional[str]):
    from r1mega.train.model_setup import build_training_model
    from r1mega.train.stages import load_weights

    tm = build_training_model(scfg.model, scfg.parallel, scfg.optimizer, total_steps=max(1, scfg.trainer.steps))
    if checkpoint:
        load_weights(tm, checkpoint, scfg.model)
    return tm


def run_recipe(cfg: R1Config, only: Optional[list[StageConfig]] = None) -> dict:
    """Run every stage (or ``only`` these); every rank calls this. Returns the summary (``summary.json``)."""
    if only is not None:
        cfg = replace(cfg, stages=list(only))
    check_stage_list(cfg)
    from r1mega.models.policy import padded_vocab_size  # noqa: F401  (readies megatron)
    from r1mega.platform.distributed import init_model_parallel, init_process_group, shutdown

    env = init_process_group(timeout_minutes=cfg.parallel.timeout_minutes)
    init_model_parallel(cfg.parallel, seed=cfg.model.seed)
    from r1mega.ckpt import save_checkpoint
    from r1mega.rewards import RewardComputer
    from r1mega.train.evaluate import judge_config, load_eval_examples, make_problems
    from r1mega.train.metrics import MetricsLogger, run_summary
    from r1mega.train.stages import weights_fingerprint

    t_start = time.monotonic()
    out = Path(cfg.trainer.output_dir)
    ckpt_root = Path(cfg.checkpoint.save_dir or out / "checkpoints")
    done = {s.name: out / s.name / "done.json" for s in cfg.stages}
    if env.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    tokenizer, tok_dir = recipe_tokenizer(cfg, out)
    metrics = MetricsLogger(out, cfg.logging, rank=env.rank, log_interval=cfg.trainer.log_interval,
                            run_config=asdict(cfg), append=any(p.exists() for p in done.values()))
    r = Recipe(cfg, out, tokenizer, tok_dir, metrics)
    if cfg.data.eval_path:
        examples = load_eval_examples(cfg.data.eval_path, cfg.data.seed, cfg.eval.max_prompts)
        r.eval_set = make_problems(examples, tokenizer, cfg.data.chat_template, cfg.data.max_prompt_length)
        if env.rank == 0:
            r.judge = RewardComputer(judge_config(cfg.reward, {e.data_source for e in examples}))
    checkpoint = cfg.checkpoint.load_dir
    if not checkpoint and env.rank == 0:
        log.warning("checkpoint.load_dir is not set: the first stage starts from a fresh seeded init (fine for "
                    "CPU recipes; for a real base model run `r1mega convert from-hf` and set checkpoint.load_dir)")
    tm, tm_checkpoint, evaluated = None, None, False
    try:
        for stage in cfg.stages:
            if done[stage.name].exists():
                info = json.loads(done[stage.name].read_text())
                checkpoint = info.get("checkpoint") or checkpoint
                r.rejection_output = info.get("sft_data") or r.rejection_output
                r.stages[stage.name] = info
                if env.rank == 0:
                    log.info("stage %s already done (%s): skipped", stage.name, done[stage.name])
                continue
            scfg = stage_config(cfg, stage, env.world_size)
            steps = scfg.trainer.steps if stage.kind != "rejection_sampling" else 0
            metrics.start_stage(stage.name, steps)
            if stage.kind != "rejection_sampling" or tm is None or tm_checkpoint != checkpoint:
                tm = None
                gc.collect()
                tm, tm_checkpoint = _fresh_model(scfg, checkpoint), checkpoint
                r.engine_stale = True
            start = weights_fingerprint(tm)
            metrics.log({"stage": "stage_start", "step": 0, "kind": stage.kind, "from": checkpoint or "init",
                         "weights_fingerprint": start})
            if not evaluated:  # the starting point, once
                r.evaluate(tm, f"before_{stage.name}")
                evaluated = True
            t0 = time.monotonic()
            info = {"kind": stage.kind, "from": checkpoint, "fingerprint_start": start,
                    **RUNNERS[stage.kind](r, stage, scfg, tm)}
            if stage.kind != "rejection_sampling":
                path = save_checkpoint(tm, ckpt_root / stage.name, steps, extra={"stage": stage.name},
                                       keep_last=1, model_cfg=cfg.model)
                checkpoint = tm_checkpoint = str(path)
            info.update({"checkpoint": checkpoint, "fingerprint_end": weights_fingerprint(tm), "steps": steps,
                         "seconds": time.monotonic() - t0})
            metrics.log({"stage": "stage_end", "step": steps, "kind": stage.kind, "checkpoint": checkpoint,
                         "weights_fingerprint": info["fingerprint_end"]})
            evals = r.evaluate(tm, f"after_{stage.name}", steps) if stage.kind != "rejection_sampling" else {}
            info.update(evals)
            r.stages[stage.name] = info
            if env.rank == 0:
                done[stage.name].parent.mkdir(parents=True, exist_ok=True)
                done[stage.name].write_text(json.dumps(info, indent=2))
        summary = {**run_summary(metrics.records, time.monotonic() - t_start), "world_size": env.world_size,
                   "final_checkpoint": checkpoint, "stages": r.stages}
        summary = metrics.finish(summary)
    finally:
        r.close()
    shutdown()
    return summary
