"""Moving a policy between recipe stages: weights come from a checkpoint, optimizer and schedule start fresh.

DeepSeek-R1 starts every stage from the previous stage's weights with a new optimizer. A stage here
builds a fresh ``TrainingModel`` (its own LR schedule over its own steps) and loads only the model
tensors of the previous stage's final checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist


def load_weights(tm, checkpoint, model_cfg=None) -> dict:
    """Load only the model weights of ``checkpoint`` (root or ``step_*`` dir) into ``tm`` (collective).

    ``load_checkpoint`` also restores the saved LR-scheduler state; this stage's own schedule (lr,
    warmup, decay over this stage's steps) is put back afterwards.
    """
    from r1mega.ckpt import load_checkpoint

    sched = tm.scheduler.state_dict()
    info = load_checkpoint(tm, checkpoint, model_cfg=model_cfg, load_optimizer=False, load_rng=False)
    tm.scheduler.num_steps = 0
    tm.scheduler.load_state_dict(sched)
    return info


@torch.no_grad()
def weights_fingerprint(tm) -> float:
    """Sum of squares of every parameter element, summed over ranks (collective).

    Identical weights in the same layout give the same number; used to show (and test) that a stage
    starts from the previous stage's final weights, not from a fresh init.
    """
    total = torch.zeros((), dtype=torch.float64)
    for p in tm.module.parameters():
        total += p.detach().double().pow(2).sum().cpu()
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total)


# ---------------------------------------------------------------------- the stage kinds
# Each runs one stage over the trainer (``train/trainer.py``) and returns what its done.json records.
# ``resume`` is the loop state of a mid-stage checkpoint of this stage (``None``: from its first step).


def sft_stage(tr, stage, scfg, resume: Optional[dict]) -> dict:
    """Masked NLL on ``stage.data`` (else the last rejection-sampling output, else ``data.train_path``)."""
    from r1mega.data.dataset import Example
    from r1mega.data.jsonl import DataError
    from r1mega.data.tasks import is_synthetic
    from r1mega.rl.learner import LearnerSettings
    from r1mega.train.run_data import stage_examples
    from r1mega.train.sft import build_rows, chat_pair, rows_from_pairs, run_sft

    spec = stage.data or tr.rejection_output or scfg.data.train_path
    multiple, seq = scfg.parallel.tp, scfg.model.seq_length
    if is_synthetic(spec):
        rows = build_rows(stage_examples(spec, scfg.data.seed), tr.tokenizer, seq, scfg.data.chat_template, multiple)
    else:
        pairs = []
        for e in stage_examples(spec, scfg.data.seed, need_reference=False):
            e: Example
            try:
                pairs.append(chat_pair(e.chat(), scfg.data.chat_template))
            except ValueError as exc:
                raise DataError(e.where, None, str(exc)) from None
        rows = rows_from_pairs(pairs, tr.tokenizer, seq, multiple)
    settings = LearnerSettings.from_config(scfg, temperature=1.0)
    run_sft(tr.tm, rows, steps=scfg.trainer.steps, global_batch_size=scfg.trainer.global_batch_size,
            seed=scfg.data.seed, on_step=tr.metrics.log, ckpt=tr.ckpt, stage=stage.name, resume=resume,
            settings=settings)
    tr.sync.stale = True
    return {"data": spec, "examples": int(rows.tokens.size(0))}


def grpo_stage(tr, stage, scfg, resume: Optional[dict]) -> dict:
    """GRPO steps over the stage's prompts (``train/grpo.py``), colocated or one step off."""
    from r1mega.rl.learner import ReferencePolicy
    from r1mega.train.evaluate import make_problems
    from r1mega.train.grpo import GRPORun, Prompt, grpo_step, learner_settings
    from r1mega.train.memory import onload
    from r1mega.train.offpolicy import OneStepOff
    from r1mega.train.run_data import stage_examples
    from r1mega.train.schedules import Colocated

    spec = stage.data or scfg.data.train_path
    problems = make_problems(stage_examples(spec, scfg.data.seed), tr.tokenizer, scfg.data.chat_template,
                             scfg.data.max_prompt_length)
    prompts = [Prompt.of(p.example, p.text, p.ids) for p in problems]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(scfg.data.seed)).tolist()
    schedule = OneStepOff(tr) if scfg.rollout.mode == "one_step_off" else Colocated(tr, scfg)
    run = GRPORun(scfg, prompts, order, max(1, scfg.trainer.global_batch_size // scfg.rollout.n),
                  learner_settings(scfg), schedule, stage_name=stage.name)
    # the reference is the stage's starting policy; a resumed stage rebuilds it from the stage's first weights
    run.reference = ReferencePolicy(tr.tm) if scfg.rl.kl_coef > 0 and resume is None else None
    first = 1
    if resume is not None:
        first = resume["stage_step"] + 1
        run.consumed_samples, run.skipped_steps = resume["consumed_samples"], resume.get("skipped_steps", 0)
        if scfg.rl.kl_coef > 0:
            run.reference = reference_from(tr, scfg)
    try:
        schedule.start(run, first, scfg.trainer.steps)
        for step in range(first, scfg.trainer.steps + 1):
            grpo_step(tr, run, step)
        onload(tr.tm)  # the stage's final checkpoint and the next stage see the whole training state
        final = schedule.finish(run, scfg.trainer.steps)
    finally:
        schedule.close()
    return {"data": spec, "prompts": len(prompts), **final}


def reference_from(tr, scfg):
    """The frozen reference of a resumed GRPO stage: the weights the stage started from (a temporary copy of
    the stage's starting policy; the global RNG, restored from the checkpoint, is left as it was)."""
    from r1mega.rl.learner import ReferencePolicy
    from r1mega.train.model_setup import build_training_model

    with torch.random.fork_rng(devices=[]):
        start = build_training_model(scfg.model, scfg.parallel, scfg.optimizer, total_steps=1)
        if tr.tm_checkpoint:
            load_weights(start, tr.tm_checkpoint, scfg.model)
        return ReferencePolicy(start)


def stage_problems(tr, stage, scfg):
    """The stage's prompts (the first ``max_prompts``) rendered and tokenized as the engine sees them."""
    from r1mega.train.evaluate import make_problems
    from r1mega.train.run_data import stage_examples

    examples = stage_examples(stage.data or scfg.data.train_path, scfg.data.seed)
    examples = examples[: stage.max_prompts] if stage.max_prompts else examples
    return make_problems(examples, tr.tokenizer, scfg.data.chat_template, scfg.data.max_prompt_length)


def filter_to_sft(tr, stage, scfg, groups, path: Path, who: str = "the policy", max_response_tokens: int = 0) -> dict:
    """Rejection-sample ``groups()`` (rank 0 only calls it) into the SFT JSONL ``path``; collective.

    Shared by rejection sampling (the policy's own generations) and distillation (the teacher's). Logs
    the report and refuses an empty result with what to change.
    """
    from r1mega.data.templates import get_template
    from r1mega.platform.distributed import broadcast_from_rank0
    from r1mega.rewards.rejection import rejection_sample

    report = None
    if tr.rank == 0:
        report = rejection_sample(groups(), path, reward_cfg=scfg.reward, max_per_prompt=stage.max_per_prompt,
                                  min_language=stage.min_language, max_response_tokens=max_response_tokens,
                                  response_prefix=get_template(scfg.data.chat_template).generation_prefix).as_dict()
    report = broadcast_from_rank0(report)
    tr.metrics.log({"stage": "rejection_sampling", "step": 0, "prompts": report["prompts"],
                    "generations": report["generations"], "kept": report["kept"],
                    **{f"dropped/{k}": v for k, v in report["dropped"].items()}})
    if report["kept"] == 0:
        raise RuntimeError(f"stage {stage.name!r}: rejection sampling kept 0 of {report['generations']} generations "
                           f"({report['dropped']}): raise samples_per_prompt, lower min_language, or train "
                           f"{who} longer before this stage")
    return report


def rejection_stage(tr, stage, scfg, resume: Optional[dict]) -> dict:
    """Sample the current policy, keep the correct, well-formatted, unique generations as SFT data."""
    from r1mega.rollout import SamplingSpec

    problems = stage_problems(tr, stage, scfg)
    tr.sync.ensure(tr.tm, f"{stage.name}: refit")
    path = tr.out / stage.name / "sft.jsonl"

    tok = tr.tokenizer
    sampling = SamplingSpec.from_config(scfg.rollout, stop_token_ids=[tok.eos_id])
    engine = tr.sync.first
    # a collective engine (megatron) samples on every rank, here; another one on rank 0, inside filter_to_sft
    ready = engine.generate([p.ids for p in problems], stage.samples_per_prompt, sampling) \
        if getattr(engine, "collective", False) else None

    def groups():
        rows = ready if ready is not None else engine.generate([p.ids for p in problems], stage.samples_per_prompt,
                                                               sampling)
        return [(p.example, [tok.decode([t for t in g.token_ids if t != tok.eos_id]) for g in row])
                for p, row in zip(problems, rows)]

    report = filter_to_sft(tr, stage, scfg, groups, path)
    tr.rejection_output = str(path)
    return {"data": stage.data or scfg.data.train_path, "sft_data": str(path), "report": report}
