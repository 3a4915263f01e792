"""The GRPO step, SPMD: every rank runs it; where the samples come from is the stage's *schedule*.

One step, top to bottom in :func:`grpo_step`: sample ``n`` responses per prompt and score them (the
schedule: colocated on rank 0's engine, or one step ahead on engine ranks) -> DAPO dynamic sampling ->
reference log-probs, the KL penalty in the reward (``rl.kl_in_reward``) -> group-relative advantages
-> routing replay's old-logprob pass -> the learner's update -> weight sync into the engine (with the
parity probe) -> one metrics line -> the checkpointer. The schedules are in ``train/schedules.py``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch

from r1mega.data.dataset import Example
from r1mega.platform import call_counts
from r1mega.rewards import RewardInput, reward_input_from_example
from r1mega.rl.advantages import compute_advantages
from r1mega.rl.balance import balance_batch
from r1mega.rl.kl import kl_penalty
from r1mega.rl.learner import LearnerBatch, LearnerSettings, compute_logprobs, prepare_routing_replay
from r1mega.rl.routing import routing_table
from r1mega.rl.updates import learner_update
from r1mega.train.memory import offload, onload

from megatron.core import parallel_state

log = logging.getLogger(__name__)

METRIC_KEYS = ("stage", "step", "reward/mean", "response_len/mean", "kl", "entropy", "clip_frac",
               "logprob_mismatch", "grad_norm", "tokens_per_s", "time/rollout", "time/reward", "time/train",
               "time/refit", "skipped_steps")


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


@dataclass
class Rollout:
    """One step's scored samples, identical on every rank. ``groups[i]``: the GRPO group of sample i."""

    gens: list
    rewards: list[float]
    groups: list[int]
    metrics: dict  # time/rollout, time/reward, reward/errors, dapo/* ...
    train_mask: Optional[list[bool]] = None  # False: a padding copy, left out of the loss


@dataclass
class GRPORun:
    """What a GRPO stage carries from step to step; ``consumed_samples`` and ``skipped_steps`` are checkpointed."""

    cfg: object  # the stage's R1Config
    prompts: list[Prompt]
    order: list[int]  # the prompt stream: a seeded permutation, repeated
    per_step: int  # prompts per step
    settings: LearnerSettings
    schedule: object  # train.schedules.Colocated | OneStepOff
    stage_name: str = "grpo"
    reference: object = None  # rl.learner.ReferencePolicy when rl.kl_coef > 0
    consumed_samples: int = 0
    skipped_steps: int = 0

    def take(self, count: int) -> list[Prompt]:
        """The next ``count`` prompts of the stream (the data position advances)."""
        picked = [self.prompts[self.order[(self.consumed_samples + i) % len(self.prompts)]] for i in range(count)]
        self.consumed_samples += count
        return picked

    def state(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "skipped_steps": self.skipped_steps}


def learner_settings(cfg) -> LearnerSettings:
    """The learner's settings for a GRPO stage (Dr.GRPO's constant defaults to ``rollout.max_new_tokens``)."""
    return LearnerSettings.from_config(cfg, constant_norm=float(cfg.rl.dr_grpo_norm_length
                                                                or cfg.rollout.max_new_tokens))


def build_batch(gens, pad_id: int, multiple: int = 1, train_mask: Optional[list[bool]] = None) -> LearnerBatch:
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
        if train_mask is None or train_mask[i]:
            mask[i, p - 1: p + r - 1] = 1.0
        rollout_logp[i, p - 1: p + r - 1] = torch.tensor(g.logprobs, dtype=torch.float32)
        lengths[i] = p + r
    batch = LearnerBatch(tokens, mask, rollout_logp=rollout_logp, lengths=lengths)
    if gens and gens[0].routed_experts is not None:  # routing replay: the engine's expert choices
        batch.rollout_experts = routing_table([g.routed_experts for g in gens], width - 1)
    return batch


def kl_reward_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str) -> torch.Tensor:
    """[B] the KL estimate of each sample summed over its response tokens (``rl.kl_in_reward``: the reward
    loses ``kl_coef`` times this, as verl's in-reward KL summed into an outcome reward)."""
    return (kl_penalty(logp, ref_logp, estimator) * mask).sum(dim=1)


def grpo_step(tr, run: GRPORun, step: int) -> dict:
    """One GRPO step on every rank; returns its metrics line (already logged and checkpointed)."""
    cfg, rl, tm = run.cfg, run.cfg.rl, tr.tm
    t_step, calls = time.monotonic(), call_counts.snapshot()
    rollout: Rollout = run.schedule.rollout(run, step)  # sample + score + dynamic sampling, every rank
    t_wait = time.monotonic() - t_step  # the learner idles while the engine samples and the rewards score
    batch = build_batch(rollout.gens, tr.tokenizer.pad_id, multiple=cfg.parallel.tp, train_mask=rollout.train_mask)
    t0 = time.monotonic()
    if run.schedule.colocated:  # the engine slept after generating: the learner's state comes back
        onload(tm)
    rewards = torch.tensor(rollout.rewards, dtype=torch.float32)
    record: dict = {}
    t_lp = time.monotonic()  # the log-prob passes before the update: reference, KL-in-reward, routing replay
    if run.reference is not None:
        batch.ref_logp = run.reference.logprobs(batch, run.settings)
    if run.reference is not None and rl.kl_in_reward:
        policy_logp = compute_logprobs(tm.ddp, tm.module, batch, run.settings)
        penalty = kl_reward_penalty(policy_logp, batch.ref_logp, batch.loss_mask, rl.kl_estimator)
        rewards = rewards - rl.kl_coef * penalty
        record["kl_in_reward/mean"] = float(penalty.mean())
    t_lp = time.monotonic() - t_lp
    batch.advantages = compute_advantages(rl.advantage_estimator, rewards, torch.tensor(rollout.groups),
                                          norm_by_std=rl.norm_by_std, eps=rl.advantage_eps)
    # whole groups were scored; now each DP rank's slice gets about the same number of tokens
    batch, balance = balance_batch(batch, parallel_state.get_data_parallel_world_size())
    t_rr = time.monotonic()
    routing_metrics = prepare_routing_replay(tm, batch, run.settings, rl.routing_replay)
    t_lp += time.monotonic() - t_rr
    updates = learner_update(tm, batch, run.settings, rl)  # rl.mini_batches x rl.epochs optimizer steps
    m = updates[-1]
    for u in updates:
        if u.skipped:
            from r1mega.train.resilience import check_skip

            run.skipped_steps += check_skip(u, "grpo", step, cfg.trainer.skip_nonfinite_loss)
    if len(updates) > 1:  # each update's own numbers; the line's loss, clip_frac, kl, grad_norm are the last's
        record["updates"] = [{"update": u.update, "epoch": u.epoch, "mini_batch": u.mini_batch,
                              "loss": u.values.get("loss", 0.0), "clip_frac": u.values.get("clip_frac", 0.0),
                              "kl": u.values.get("kl", 0.0), "grad_norm": u.grad_norm, "skipped": u.skipped}
                             for u in updates]
    t_train = time.monotonic() - t0
    if run.schedule.colocated:  # the engine gets the device memory back (a no-op on CPU)
        offload(tm)
    sync = run.schedule.after_update(run, step)  # weight sync (+ parity probe) into the engine(s)
    v = m.values
    timings = rollout.metrics.get("time/rollout", 0.0) + rollout.metrics.get("time/reward", 0.0)
    record.update({
        "stage": "grpo", "step": step, "reward/mean": sum(rollout.rewards) / len(rollout.rewards),
        "response_len/mean": float(batch.loss_mask.sum()) / (sum(rollout.train_mask) if rollout.train_mask
                                                            else batch.size),
        "kl": v.get("kl", 0.0), "entropy": v.get("entropy", 0.0), "clip_frac": v.get("clip_frac", 0.0),
        "logprob_mismatch": v.get("mismatch_abs_mean", 0.0), "grad_norm": m.grad_norm, "loss": v.get("loss", 0.0),
        "skipped": m.skipped, "skipped_steps": run.skipped_steps,
        "tokens_per_s": float(batch.lengths.sum()) / max(timings + t_train + sync.get("time/refit", 0.0), 1e-9),
        "time/train": t_train, "time/logprobs": t_lp, "time/wait_rollout": t_wait,
        "consumed_samples": run.consumed_samples,
        "batch/dp_token_imbalance": balance.imbalance,
        **rollout.metrics, **sync, **routing_metrics,
    })
    if "tis_clip_frac" in v:
        record["tis_clip_frac"] = v["tis_clip_frac"]
    interval = cfg.trainer.eval_interval
    if interval and step % interval == 0 and tr.eval_set is not None:
        record.update(tr.evaluate(run.stage_name, step, in_step=True))
    record["time/step"] = time.monotonic() - t_step
    record.update(call_counts.since(calls))  # this step's collectives and engine round trips (the budget test)
    record = tr.metrics.log(record)
    tr.ckpt.end_of_step(run.stage_name, step, run.state())
    return record
