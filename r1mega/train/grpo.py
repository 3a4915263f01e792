"""The GRPO loop (DESIGN.md §3), SPMD: every rank runs this; rank 0 also owns the rollout engine.

One step: take the next ``prompts_per_step`` prompts (the data position is counted in global
samples) -> the engine samples ``n`` responses per prompt with their sampling log-probs -> rewards ->
group-relative advantages (group = prompt) -> rank 0 broadcasts the rollouts -> every rank builds the
same ``LearnerBatch`` (prompt + response, response-only loss mask, rollout log-probs for TIS) and runs
``learner_step`` (plus reference log-probs when ``rl.kl_coef > 0``) -> the bridge streams the new
weights into the engine (collective; rank 0 pushes) -> one metrics line to ``metrics.jsonl``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from r1mega.data.dataset import Example
from r1mega.platform.distributed import broadcast_from_rank0
from r1mega.rewards import RewardComputer, RewardInput, reward_input_from_example
from r1mega.rl.advantages import compute_advantages
from r1mega.rl.learner import LearnerBatch, LearnerSettings, ReferencePolicy, learner_step, prepare_routing_replay
from r1mega.rl.routing import routing_table
from r1mega.rollout import SamplingSpec
from r1mega.train.metrics import MetricsLogger
from r1mega.train.resilience import check_skip
from r1mega.train.rewarders import TrainingRewarder

log = logging.getLogger(__name__)

METRIC_KEYS = ("stage", "step", "reward/mean", "response_len/mean", "kl", "entropy", "clip_frac",
               "logprob_mismatch", "grad_norm", "tokens_per_s", "time/rollout", "time/reward", "time/train",
               "time/refit", "skipped_steps")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@dataclass
class Prompt:
    """One task instance: ``ids`` are what the engine continues; ``text`` is the rendered prompt.

    ``example`` is the record it came from: the rewards need its ``tests`` (code), ``meta`` (e.g.
    countdown ``numbers``) and the user's question (model rewards), not only ``answer``.
    """

    ids: list[int]
    text: str
    answer: str
    data_source: str = "arithmetic"
    example: Optional[Example] = None

    @classmethod
    def of(cls, example: Example, text: str, ids: list[int]) -> Prompt:
        """The prompt of ``example`` rendered as ``text`` and tokenized as ``ids``."""
        return cls(ids, text, example.answer, example.data_source, example)

    def reward_input(self, response: str, response_length: int) -> RewardInput:
        """What the rewards see for one ``response`` to this prompt (the whole example when there is one)."""
        if self.example is not None:
            return reward_input_from_example(self.example, response, self.text, response_length)
        return RewardInput(response=response, reference=self.answer, prompt=self.text, data_source=self.data_source,
                           response_length=response_length)


class RolloutFailure(RuntimeError):
    """The rollout engine or the reward computation failed on rank 0; raised on every rank (no hang)."""


def sample_and_score(engine, rewarder: RewardComputer, prompts: list[Prompt], n: int, sampling: SamplingSpec,
                     tokenizer, step: int = 0) -> tuple[list, list[float], float, float, int]:
    """Rank 0: ``(generations flattened prompt-major, rewards, t_rollout, t_reward, reward errors)``."""
    t0 = time.monotonic()
    try:
        gens = [g for row in engine.generate([p.ids for p in prompts], n, sampling) for g in row]
    except Exception as e:
        raise RolloutFailure(f"grpo step {step}: the rollout engine failed in generate ({len(prompts)} prompts x "
                             f"{n} samples): {type(e).__name__}: {e}") from e
    t1 = time.monotonic()
    eos = tokenizer.eos_id
    samples = [prompts[g.prompt_index].reward_input(tokenizer.decode([t for t in g.token_ids if t != eos]),
                                                    len(g.token_ids)) for g in gens]
    try:
        results = rewarder.compute(samples)
    except Exception as e:
        raise RolloutFailure(f"grpo step {step}: the reward computation failed ({len(samples)} samples): "
                             f"{type(e).__name__}: {e}") from e
    errors = sum(bool(r.errors) for r in results)
    if errors:  # a failed term or a dead / timed-out reward worker scores 0: say so, with the step
        first = next(r.errors for r in results if r.errors)
        log.warning("grpo step %d: %d/%d samples have reward errors (scored 0), e.g. %s", step, errors,
                    len(results), first)
    return gens, [r.total for r in results], t1 - t0, time.monotonic() - t1, errors


def _from_rank0(compute: Callable, is_rank0: bool):
    """Rank 0 runs ``compute()``; every rank gets its result, or raises its failure (never waits forever)."""
    out = None
    if is_rank0:
        try:
            out = ("ok", compute())
        except Exception as e:
            broadcast_from_rank0(("error", str(e) if isinstance(e, RolloutFailure) else f"{type(e).__name__}: {e}"))
            raise
    status, value = broadcast_from_rank0(out)
    if status != "ok":
        raise RolloutFailure(f"{value} (reported by rank 0)")
    return value


def build_batch(gens, rewards: list[float], n: int, pad_id: int, rl, multiple: int = 1) -> LearnerBatch:
    """Prompt + response rows; the loss mask and rollout log-probs cover the response tokens."""
    width = max(len(g.prompt_token_ids) + len(g.token_ids) for g in gens)
    width += (-(width - 1)) % multiple
    B = len(gens)
    tokens = torch.full((B, width), pad_id, dtype=torch.long)
    mask, rollout_logp = torch.zeros(B, width - 1), torch.zeros(B, width - 1)
    lengths = torch.zeros(B, dtype=torch.long)
    for i, g in enumerate(gens):
        p, r = len(g.prompt_token_ids), len(g.token_ids)
        tokens[i, : p + r] = torch.tensor(g.prompt_token_ids + g.token_ids)
        mask[i, p - 1: p + r - 1] = 1.0
        rollout_logp[i, p - 1: p + r - 1] = torch.tensor(g.logprobs, dtype=torch.float32)
        lengths[i] = p + r
    groups = torch.arange(B) // n
    adv = compute_advantages(rl.advantage_estimator, torch.tensor(rewards, dtype=torch.float32), groups,
                             norm_by_std=rl.norm_by_std, eps=rl.advantage_eps)
    batch = LearnerBatch(tokens, mask, advantages=adv, rollout_logp=rollout_logp, lengths=lengths)
    # --- routing replay (issue 9): the engine's expert choices, when it returns them ---
    if gens and gens[0].routed_experts is not None:
        batch.rollout_experts = routing_table([g.routed_experts for g in gens], width - 1)
    return batch


def refit(engine, tm, model_cfg, bucket_bytes: int, what: str = "refit") -> float:
    """Stream the trainer's weights into the engine (collective; only rank 0 pushes).

    If the push fails, rank 0 still drains the export (its gathers are collectives) and every rank raises.
    """
    from r1mega.bridge.export import export_hf_buckets

    t0 = time.monotonic()
    buckets = export_hf_buckets(tm.module, tm.config, model_cfg, bucket_bytes)
    error = None
    if engine is not None:
        try:
            engine.update_weights(buckets)
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            error = f"{what}: the rollout engine failed in update_weights: {type(e).__name__}: {e}"
            log.error("%s", error)
    for _ in buckets:
        pass
    error = broadcast_from_rank0(error)
    if error is not None:
        raise RolloutFailure(error)
    return time.monotonic() - t0


def run_grpo(cfg, tm, engine, tokenizer, prompts: list[Prompt], *, steps: int, prompts_per_step: int,
             out_dir: Path, rewarder: Optional[RewardComputer] = None, start_step: int = 0,
             consumed_samples: int = 0, evaluate: Optional[Callable[[int], dict]] = None, ckpt=None,
             resume: Optional[dict] = None, metrics: Optional[MetricsLogger] = None) -> dict:
    """GRPO steps ``start_step + 1 .. steps``; returns ``{"history": [...], "consumed_samples": ...}``.

    ``engine`` is the rollout engine on rank 0 and ``None`` elsewhere; it must already hold the
    trainer's weights. ``evaluate(step)`` (collective, optional) runs every ``trainer.eval_interval``
    steps and its result joins that step's metrics line. ``ckpt`` (a ``resilience.Checkpointer``) is
    told about every step (periodic / on-signal checkpoints); ``resume`` is the ``extra`` of a
    GRPO-stage checkpoint (step, data position, skipped-step count) to continue from. ``metrics``
    receives every step's record (default: a logger writing ``<out_dir>/metrics.jsonl``, appending).
    """
    skipped_steps = 0
    if resume is not None:
        start_step, consumed_samples = resume["stage_step"], resume["consumed_samples"]
        skipped_steps = resume.get("skipped_steps", 0)
    rl, n = cfg.rl, cfg.rollout.n
    if cfg.rollout.mode != "colocated":  # issue 9: the disaggregated loop is r1mega.train.offpolicy
        raise ValueError(f"run_grpo is the colocated loop but rollout.mode={cfg.rollout.mode!r}: run "
                         "r1mega.train.offpolicy (engine ranks: engine_loop, learners: run_one_step_off)")
    settings = LearnerSettings(micro_batch_size=cfg.parallel.micro_batch_size, valid_vocab=cfg.model.vocab_size,
                               temperature=cfg.rollout.temperature)
    sampling = SamplingSpec.from_config(cfg.rollout, stop_token_ids=[tokenizer.eos_id])
    reference = ReferencePolicy(tm) if rl.kl_coef > 0 else None
    own_rewarder = rewarder is None and engine is not None
    if own_rewarder:
        rewarder = TrainingRewarder(cfg.reward, cfg.rollout.max_new_tokens)
    bucket_bytes = int(cfg.rollout.refit_bucket_mb * 2**20)
    tp = cfg.parallel.tp
    own_metrics = metrics is None
    if own_metrics:
        metrics = MetricsLogger(out_dir, cfg.logging, rank=rank(), log_interval=cfg.trainer.log_interval, append=True)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.data.seed)).tolist()
    history = []
    try:
        for step in range(start_step + 1, steps + 1):
            t_step = time.monotonic()
            picked = [prompts[order[(consumed_samples + i) % len(prompts)]] for i in range(prompts_per_step)]
            consumed_samples += prompts_per_step
            if cfg.rollout.seed is not None:  # a function of the step alone: a resumed run samples the same
                sampling.seed = cfg.rollout.seed + step * 100_003
            gens, rewards, t_rollout, t_reward, reward_errors = _from_rank0(
                partial(sample_and_score, engine, rewarder, picked, n, sampling, tokenizer, step), engine is not None)
            t_wait = time.monotonic() - t_step  # the learner is idle while rank 0 samples and scores
            batch = build_batch(gens, rewards, n, tokenizer.pad_id, rl, multiple=tp)
            t0 = time.monotonic()
            if reference is not None:
                batch.ref_logp = reference.logprobs(batch, settings)
            # --- routing replay (issue 9): old-logprob pass recording (R2) or replaying (R3) MoE routing ---
            routing_metrics = prepare_routing_replay(tm, batch, settings, rl.routing_replay)
            m = learner_step(tm, batch, settings, rl)
            skipped_steps += check_skip(m, "grpo", step, cfg.trainer.skip_nonfinite_loss)
            t_train = time.monotonic() - t0
            t_refit = refit(engine, tm, cfg.model, bucket_bytes, f"grpo step {step}")
            tokens = float(batch.lengths.sum())
            v = m.values
            record = {
                "stage": "grpo", "step": step, "reward/mean": sum(rewards) / len(rewards),
                "response_len/mean": float(batch.loss_mask.sum()) / batch.size, "kl": v.get("kl", 0.0),
                "entropy": v.get("entropy", 0.0), "clip_frac": v.get("clip_frac", 0.0),
                "logprob_mismatch": v.get("mismatch_abs_mean", 0.0), "grad_norm": m.grad_norm,
                "loss": v.get("loss", 0.0), "skipped": m.skipped, "skipped_steps": skipped_steps,
                "reward/errors": reward_errors,
                "tokens_per_s": tokens / max(t_rollout + t_reward + t_train + t_refit, 1e-9),
                "time/rollout": t_rollout, "time/reward": t_reward, "time/train": t_train, "time/refit": t_refit,
                "time/wait_rollout": t_wait, "time/step": time.monotonic() - t_step,
                "consumed_samples": consumed_samples, **routing_metrics,
            }
            interval = cfg.trainer.eval_interval
            if evaluate is not None and interval and step % interval == 0:
                record.update(evaluate(step))
            history.append(metrics.log(record))
            if ckpt is not None:
                ckpt.end_of_step("grpo", step, {"consumed_samples": consumed_samples, "skipped_steps": skipped_steps})
    finally:
        if own_rewarder:
            rewarder.close()
        if own_metrics:
            metrics.close()
    return {"history": history, "consumed_samples": consumed_samples}
