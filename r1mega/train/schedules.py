"""Where a GRPO step's samples come from and where its new weights go: the two schedules of one step.

* :class:`Colocated` (``rollout.mode=colocated``): every rollout-TP group's engine samples its share of
  the step's prompts (round-robin, so a GRPO group stays on one engine) with the current weights, the
  rewards score them on the engine's rank, every rank receives all samples, and DAPO dynamic sampling
  keeps the informative groups (generating more when it must); after the update the weights are pushed
  into every engine (``WeightSync.refit``, with the parity probe on every engine).
* ``OneStepOff`` (``rollout.mode=one_step_off``, ``train/offpolicy.py``): engine ranks sample batch
  k+1 while the learners train batch k.

Sampling seeds are a function of the step and the prompt's index in it (``rollout.seed + step * 100003 +
1009 * refill round + index``), so a resumed run, and a run with another number of engines, samples the
same responses.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from r1mega.rl.advantages import select_informative_groups
from r1mega.rollout import SamplingSpec
from r1mega.train.grpo import GRPORun, Rollout
from r1mega.train.weight_sync import RolloutFailure, gather_objects

log = logging.getLogger(__name__)


def step_sampling(cfg, eos_id: int, step: int, round_: int = 0) -> SamplingSpec:
    """The step's sampling: seeded by the step alone (and the refill round), so a resumed run samples the same."""
    sampling = SamplingSpec.from_config(cfg.rollout, stop_token_ids=[eos_id])
    if cfg.rollout.seed is not None:
        sampling = replace(sampling, seed=cfg.rollout.seed + step * 100_003 + round_ * 1_009)
    return sampling


def score(prompts: list, gens: list, rewarder, tokenizer, step: int) -> tuple[list[float], int]:
    """Rewards of ``gens`` (``g.prompt_index`` into ``prompts``) and how many samples had reward errors."""
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
    return [r.total for r in results], errors


def sample_and_score(engine, rewarder, prompts: list, n: int, sampling: SamplingSpec, tokenizer,
                     step: int = 0) -> tuple[list, list[float], float, float, int]:
    """One engine: ``(generations flattened prompt-major, rewards, t_rollout, t_reward, reward errors)``."""
    t0 = time.monotonic()
    try:
        gens = [g for row in engine.generate([p.ids for p in prompts], n, sampling) for g in row]
    except Exception as e:
        raise RolloutFailure(f"grpo step {step}: the rollout engine failed in generate ({len(prompts)} prompts x "
                             f"{n} samples): {type(e).__name__}: {e}") from e
    t1 = time.monotonic()
    rewards, errors = score(prompts, gens, rewarder, tokenizer, step)
    return gens, rewards, t1 - t0, time.monotonic() - t1, errors


def dynamic_sampling(run: GRPORun, step: int, sample) -> Rollout:
    """DAPO dynamic sampling on the engine's rank: keep groups whose rewards differ, up to ``per_step``.

    ``sample(prompts, round)`` -> ``(gens, rewards, t_rollout, t_reward, errors)``. ``rl.refill_policy``:
    ``resample`` generates another ``per_step`` prompts per round (at most ``rl.max_refill_rounds``),
    ``duplicate`` repeats kept groups, ``none`` trains on fewer. A batch still short of ``per_step`` groups
    is filled with copies that are left out of the loss, so its shape (DP and micro-batch split) holds.
    """
    rl, n = run.cfg.rl, run.cfg.rollout.n
    gens, rewards, t_roll, t_rew, errors = sample(run.take(run.per_step), 0)
    groups = [i // n for i in range(len(gens))]
    metrics = {"time/rollout": t_roll, "time/reward": t_rew, "reward/errors": errors}
    if not rl.drop_uniform_groups:
        return Rollout(gens, rewards, groups, metrics)
    first_round_groups, rounds = len(gens) // n, 0
    while True:
        sel = select_informative_groups(torch.tensor(rewards), torch.tensor(groups), run.per_step, rl.refill_policy)
        if sel.stats.num_missing_groups == 0 or rl.refill_policy != "resample" or rounds >= rl.max_refill_rounds:
            break
        rounds += 1
        g2, r2, t1, t2, e2 = sample(run.take(run.per_step), rounds)
        base = len(gens) // n
        gens, rewards = gens + g2, rewards + r2
        groups += [base + i // n for i in range(len(g2))]
        metrics["time/rollout"] += t1
        metrics["time/reward"] += t2
        metrics["reward/errors"] += e2
    st = sel.stats
    idx, new_groups = sel.indices.tolist(), st.group_ids.tolist()
    if not idx:  # nothing informative anywhere: train on the first groups (their advantages are all 0)
        idx, new_groups = list(range(run.per_step * n)), [i // n for i in range(run.per_step * n)]
    mask, have = [True] * len(idx), len(set(new_groups))
    for j in range(run.per_step - have):  # still short: copies of kept groups, left out of the loss
        first = (j % have) * n
        idx += idx[first: first + n]
        new_groups += [have + j] * n
        mask += [False] * n
    from_refill = sum(1 for gid in {groups[i] for i in sel.indices.tolist()} if gid >= first_round_groups)
    metrics.update({"dapo/groups_kept": st.num_kept_groups, "dapo/groups_dropped":
                    st.num_candidate_groups - st.num_kept_groups, "dapo/groups_refilled":
                    from_refill + st.num_duplicated_groups, "dapo/groups_padded": mask.count(False) // n,
                    "dapo/rounds": rounds})
    return Rollout([gens[i] for i in idx], [rewards[i] for i in idx], new_groups, metrics,
                   train_mask=mask if not all(mask) else None)


class Colocated:
    """Every rollout-TP group's engine samples its share of the step's prompts with the current weights and
    scores it; every rank gets all samples; the update is pushed into every engine right after."""

    colocated = True  # the engine shares the learner's devices: memory handoff around training

    def __init__(self, tr, cfg):
        """``cfg``: the stage's config (its reward and rollout sections)."""
        self.tr = tr
        self.rewarder = None
        if tr.sync.engine_index is not None:  # rewards are scored where the samples were generated
            from r1mega.train.rewarders import TrainingRewarder

            self.rewarder = TrainingRewarder(cfg.reward, cfg.rollout.max_new_tokens)

    def start(self, run: GRPORun, first_step: int, last_step: int) -> None:
        self.tr.sync.ensure(self.tr.tm, f"{run.stage_name}: refit before step {first_step}")

    def sample(self, run: GRPORun, prompts: list, step: int, round_: int) -> tuple[list, list, float, float, int]:
        """Collective: the engines sample and score their shares; every rank returns all of it in prompt order."""
        tr, cfg = self.tr, run.cfg
        n = cfg.rollout.n
        rows, error, t_gen = tr.sync.generate([p.ids for p in prompts], n, step_sampling(cfg, tr.tokenizer.eos_id,
                                                                                         step, round_),
                                              f"grpo step {step}")
        rewards, errors, t_reward = {}, 0, 0.0
        if rows and error is None:
            t1 = time.monotonic()
            order = sorted(rows)
            gens = [g for i in order for g in rows[i]]
            for i in order:
                for g in rows[i]:
                    g.prompt_index = i
            try:
                flat, errors = score(prompts, gens, self.rewarder, tr.tokenizer, step)
                rewards = {i: flat[k * n:(k + 1) * n] for k, i in enumerate(order)}
            except RolloutFailure as e:
                error = str(e)
            t_reward = time.monotonic() - t1
        parts = gather_objects((rows, rewards, error, t_gen, t_reward, errors))
        failed = [(r, p[2]) for r, p in enumerate(parts) if p[2]]
        if failed:
            rank, message = failed[0]
            raise RolloutFailure(message if rank == tr.rank else f"{message} (reported by rank {rank})")
        by_prompt, scores = {}, {}
        for p in parts:
            by_prompt.update(p[0])
            scores.update(p[1])
        gens = [g for i in range(len(prompts)) for g in by_prompt[i]]
        return (gens, [r for i in range(len(prompts)) for r in scores[i]], max(p[3] for p in parts),
                max(p[4] for p in parts), sum(p[5] for p in parts))

    def rollout(self, run: GRPORun, step: int) -> Rollout:
        rollout = dynamic_sampling(run, step, lambda prompts, round_: self.sample(run, prompts, step, round_))
        self.tr.sync.sleep()  # generate -> sleep (a GPU engine frees its KV cache) -> train -> wake -> sync
        return rollout

    def after_update(self, run: GRPORun, step: int) -> dict:
        self.tr.sync.stale = True
        interval = run.cfg.rollout.parity_check_interval
        return self.tr.sync.refit(self.tr.tm, f"{run.stage_name} step {step}",
                                  probe=bool(interval) and step % interval == 0)

    def finish(self, run: GRPORun, last_step: int) -> dict:
        return {}

    def close(self) -> None:
        if self.rewarder is not None:
            self.rewarder.close()
