"""One-step-off-policy GRPO (``rollout.mode=one_step_off``): engines on their own ranks generate batch
k+1 while the learners train on batch k.

Why: colocated, the learner idles while the engine generates and vice versa. Disaggregated, both run
at once; the price is that batch k+1 was sampled by the weights before step k's update (staleness 1),
which truncated importance sampling corrects: the learner's TIS weight ``min(pi_current / pi_engine, C)``
uses the engine's sampling log-probs, so ``rl.tis_cap`` is required (config validation says so).

The last ``rollout.engine_ranks`` ranks of the launcher's world run :func:`serve_engine`; the learners
run ``r1mega train``'s stages with the :class:`OneStepOff` schedule of the GRPO step. For each GRPO stage
learner rank 0 sends the engines a set-up message (the HF export of the stage's starting weights, the
prompt stream, the steps); the schedule on the transfer group (``platform.disaggregated``) is then, in
this order on both sides::

    engine : gen s | send s | (s > first) recv v_s-1 | gen s+1 | send s+1 | recv v_s | ...
    learner:         recv s | (s > first) send v_s-1 | train s -> v_s | recv s+1 | send v_s | ...

``v_j`` = weights after step ``j``. Weights go as the bridge's buckets (the export is collective over
the learners; learner rank 0 broadcasts each bucket as one flat buffer per dtype), so memory stays at
one bucket. Every sample carries the version that sampled it. After the stage's last step the engines
take the final weights and answer the parity probe. Rewards are computed on the engine ranks.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterator, Optional

import torch

from r1mega.platform.disaggregated import Role, TransferGroup
from r1mega.platform.distributed import broadcast_from_rank0
from r1mega.train.grpo import GRPORun, Rollout
from r1mega.train.weight_sync import RolloutFailure

log = logging.getLogger(__name__)

_END = "end-of-weights"
_DONE = "no-more-stages"


# ----------------------------------------------------------------------------- weights


def send_weights(transfer: Optional[TransferGroup], buckets, version: int) -> None:
    """Learners: walk the (collective) export; learner rank 0 broadcasts each bucket to the engines."""
    for bucket in buckets:
        if transfer is None:
            continue
        meta, flat = [], {}
        for name, t in bucket:
            meta.append((name, tuple(t.shape), str(t.dtype).replace("torch.", "")))
            flat.setdefault(t.dtype, []).append(t.detach().reshape(-1))
        transfer.broadcast_object(meta, src=0)
        for dtype in sorted(flat, key=str):
            transfer.broadcast(torch.cat(flat[dtype]).contiguous(), src=0)
    if transfer is not None:
        transfer.broadcast_object((_END, version), src=0)


def receive_weights(transfer: TransferGroup) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Engines: the buckets of one push, as ``(HF name, tensor)`` lists (feed to ``engine.update_weights``)."""
    while True:
        meta = transfer.broadcast_object(None, src=0)
        if isinstance(meta, tuple) and meta and meta[0] == _END:
            return
        by_dtype: dict[str, list] = {}
        for name, shape, dtype in meta:
            by_dtype.setdefault(dtype, []).append((name, shape))
        bucket = []
        for dtype in sorted(by_dtype, key=lambda d: str(getattr(torch, d))):
            items = by_dtype[dtype]
            numel = sum(int(torch.Size(s).numel()) for _, s in items)
            buf = transfer.broadcast(torch.empty(numel, dtype=getattr(torch, dtype)), src=0)
            offset = 0
            for name, shape in items:
                n = int(torch.Size(shape).numel())
                bucket.append((name, buf[offset: offset + n].view(shape)))
                offset += n
        yield bucket


def push_weights(tr, version: int) -> None:
    """Learners (collective export): the current weights to every engine rank."""
    from r1mega.bridge.export import export_hf_buckets

    cfg = tr.cfg
    send_weights(tr.role.transfer, export_hf_buckets(tr.tm.module, tr.tm.config, cfg.model,
                                                     int(cfg.rollout.refit_bucket_mb * 2**20)), version)


# ----------------------------------------------------------------------------- engine ranks


def serve_engine(cfg, role: Role, engine_env: Optional[dict] = None) -> None:
    """An engine rank: serve every GRPO stage the learners announce, until they say there are no more."""
    from r1mega.data.tokenizer import HFTokenizer
    from r1mega.rollout import build_engine
    from r1mega.train.rewarders import TrainingRewarder
    from r1mega.train.schedules import sample_and_score, step_sampling

    transfer = role.transfer
    while True:
        setup = transfer.broadcast_object(None, src=0)
        if setup == _DONE:
            return
        scfg = setup["cfg"]
        tokenizer = HFTokenizer(setup["tokenizer_dir"])
        engine = build_engine(setup["hf_dir"], scfg.rollout, in_process=False, env=engine_env or {})
        rewarder = TrainingRewarder(scfg.reward, scfg.rollout.max_new_tokens)
        prompts, order, per_step = setup["prompts"], setup["order"], setup["per_step"]
        first, last, consumed = setup["first_step"], setup["last_step"], setup["consumed_samples"]
        R = len(role.engine_src)
        version = first - 1
        try:
            for step in range(first, last + 1):
                start = consumed + (step - first) * per_step
                mine = [prompts[order[(start + i) % len(prompts)]] for i in range(per_step)][role.engine_index::R]
                try:
                    gens, rewards, t_roll, t_rew, errors = sample_and_score(
                        engine, rewarder, mine, scfg.rollout.n, step_sampling(scfg, tokenizer.eos_id, step),
                        tokenizer, step)
                    for g in gens:
                        g.prompt_index = g.prompt_index * R + role.engine_index
                        g.policy_version = version
                    mine_out = ("ok", gens, rewards, t_roll, t_rew, errors)
                except RolloutFailure as e:
                    mine_out = ("error", str(e))
                for src in role.engine_src:  # every engine's share, in engine order
                    transfer.broadcast_object(mine_out if src == transfer.rank else None, src)
                if mine_out[0] == "error":
                    raise RolloutFailure(mine_out[1])
                if step > first:  # v_{step-1} arrives after batch `step` left (the learners train it meanwhile)
                    engine.update_weights(receive_weights(transfer))
                    version = step - 1
            engine.update_weights(receive_weights(transfer))  # the final weights: the engine ends in sync
            for src in role.engine_src:  # parity probe: the pushed weights are the learner's
                transfer.broadcast_object(engine.prompt_logprobs(setup["probe"]) if src == transfer.rank else None,
                                          src)
        finally:
            engine.close()
            rewarder.close()


# ----------------------------------------------------------------------------- learner ranks


def apply_staleness_bound(rollout: Rollout, staleness: list[int], max_staleness: int) -> list[int]:
    """Leave samples staler than ``max_staleness`` out of the loss; returns their indices.

    With this schedule staleness is 0 (a stage's first batch) or 1; the bound guards the contract (TIS is
    only a good correction for small policy lags) should a schedule or engine run further ahead.
    """
    dropped = [i for i, s in enumerate(staleness) if s > max_staleness]
    if dropped:
        mask = list(rollout.train_mask or [True] * len(rollout.gens))
        for i in dropped:
            mask[i] = False
        rollout.train_mask = mask
    return dropped


class OneStepOff:
    """The learners' side: batches arrive from the engine ranks; weights leave one step behind."""

    colocated = False  # the engines have devices of their own

    def __init__(self, tr):
        self.tr = tr
        self.pending = False  # the last update's weights, pushed after the next batch arrived

    def start(self, run: GRPORun, first_step: int, last_step: int) -> None:
        """Collective: export the stage's starting weights for the engines and announce the stage to them."""
        from r1mega.bridge.hf_dir import save_hf
        from r1mega.rollout import probe_batch

        tr, cfg = self.tr, run.cfg
        hf_dir = tr.out / run.stage_name / "engine_hf"
        save_hf(tr.tm.module, tr.tm.config, cfg.model, hf_dir, tokenizer_dir=tr.tok_dir)
        self.probe = probe_batch(cfg.model.vocab_size, batch=cfg.rollout.parity_probe_batch,
                                 length=cfg.rollout.parity_probe_length, seed=1)
        if tr.role.transfer is not None:
            tr.role.transfer.broadcast_object(
                {"cfg": cfg, "hf_dir": str(hf_dir), "tokenizer_dir": str(tr.tok_dir), "prompts": run.prompts,
                 "order": run.order, "per_step": run.per_step, "consumed_samples": run.consumed_samples,
                 "first_step": first_step, "last_step": last_step, "probe": self.probe}, src=0)

    def rollout(self, run: GRPORun, step: int) -> Rollout:
        import time

        role = self.tr.role
        t0 = time.monotonic()
        got = None
        if role.transfer is not None:
            parts = [role.transfer.broadcast_object(None, src) for src in role.engine_src]
            errors = [p[1] for p in parts if p[0] == "error"]
            got = ("error", errors[0]) if errors else ("ok", (
                [g for p in parts for g in p[1]], [r for p in parts for r in p[2]], max(p[3] for p in parts),
                max(p[4] for p in parts), sum(p[5] for p in parts)))
        status, value = broadcast_from_rank0(got)
        if status != "ok":
            raise RolloutFailure(f"{value} (reported by an engine rank)")
        gens, rewards, t_roll, t_rew, errors = value
        order = sorted(range(len(gens)), key=lambda i: (gens[i].prompt_index, gens[i].sample_index))
        gens, rewards = [gens[i] for i in order], [rewards[i] for i in order]
        run.consumed_samples += run.per_step
        metrics = {"time/rollout": t_roll, "time/reward": t_rew, "reward/errors": errors,
                   "time/wait_engines": time.monotonic() - t0}
        if self.pending:  # v_{step-1}: the engines generate batch step+1 with it while we train
            t1 = time.monotonic()
            push_weights(self.tr, step - 1)
            metrics["time/push"] = time.monotonic() - t1
            self.pending = False
        n = run.cfg.rollout.n
        rollout = Rollout(gens, rewards, [i // n for i in range(len(gens))], metrics)
        staleness = [step - 1 - g.policy_version for g in gens]
        dropped = apply_staleness_bound(rollout, staleness, run.cfg.rollout.max_staleness)
        metrics.update({"staleness/mean": sum(staleness) / len(staleness), "staleness/max": max(staleness),
                        "staleness/dropped": len(dropped)})
        return rollout

    def after_update(self, run: GRPORun, step: int) -> dict:
        self.pending = True
        return {}

    def finish(self, run: GRPORun, last_step: int) -> dict:
        """After the stage's last step: the final weights to the engines, then the parity probe (collective)."""
        from r1mega.rl.learner import LearnerBatch, compute_logprobs
        from r1mega.rollout import compare

        tr = self.tr
        push_weights(tr, last_step)
        tokens = torch.tensor(self.probe)
        trainer = compute_logprobs(tr.tm.ddp, tr.tm.module, LearnerBatch(tokens, torch.ones(tokens.size(0),
                                                                                          tokens.size(1) - 1)),
                                   dataclasses.replace(run.settings, micro_batch_size=1, temperature=1.0))
        report = None
        if tr.role.transfer is not None:  # the worst engine
            reports = [compare(tr.role.transfer.broadcast_object(None, src), trainer) for src in tr.role.engine_src]
            report = {"parity/max_abs_logp": max(r.max_abs for r in reports),
                      "parity/mean_abs_logp": max(r.mean_abs for r in reports)}
        return broadcast_from_rank0(report)

    def close(self) -> None:
        pass


def release_engines(role: Optional[Role]) -> None:
    """Learner rank 0, at the end of a run: tell the engine ranks that no stage follows."""
    if role is not None and role.transfer is not None:
        role.transfer.broadcast_object(_DONE, src=0)
