"""One-step-off-policy GRPO (``rollout.mode=one_step_off``): engines on their own ranks generate batch
k+1 while the learners train on batch k.

Why: colocated, the learner idles while the engine generates and vice versa. Disaggregated, both run
at once; the price is that batch k+1 was sampled by the weights before step k's update (staleness 1),
which truncated importance sampling corrects: the learner's TIS weight ``min(pi_current / pi_engine, C)``
uses the engine's sampling log-probs, so ``rl.tis_cap`` is required (config validation says so).

Schedule on the transfer group (``platform.disaggregated``), identical order on both sides::

    engine : gen 0 (v0) | send 0 | gen 1 (v0) | send 1 | recv v1 | gen 2 (v1) | send 2 | recv v2 | ...
    learner:              recv 0 | train 0 -> v1 | recv 1 | send v1 | train 1 -> v2 | recv 2 | send v2 | ...

``v_j`` = weights after ``j`` optimizer steps. Weights go as the bridge's buckets (the export is
collective over the learners; learner rank 0 broadcasts each bucket as one flat buffer per dtype),
so memory stays at one bucket. Every sample carries the version that sampled it; staleness = the
learner's version at training time minus that. Samples staler than ``rollout.max_staleness`` are left
out of the loss (counted). Rewards are computed on the engine ranks. The prompt order and the
sampling seeds depend only on the step, so a run is reproducible with a fixed seed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from r1mega.platform.disaggregated import Role, TransferGroup
from r1mega.rollout import SamplingSpec

log = logging.getLogger(__name__)

_END = "end-of-weights"


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


# ----------------------------------------------------------------------------- engine ranks


def _step_prompts(prompts: list, order: list[int], step: int, per_step: int) -> list:
    return [prompts[order[(step * per_step + i) % len(prompts)]] for i in range(per_step)]


def _sampling(cfg, eos_id: int, step: int) -> SamplingSpec:
    sampling = SamplingSpec.from_config(cfg.rollout, stop_token_ids=[eos_id])
    if cfg.rollout.seed is not None:
        sampling.seed = cfg.rollout.seed + step * 100_003
    return sampling


def engine_loop(cfg, role: Role, steps: int, engine_env: Optional[dict] = None) -> None:
    """An engine rank: wait for the learners' set-up message, then generate / send / take weights."""
    from r1mega.data.tokenizer import HFTokenizer
    from r1mega.rollout import build_engine
    from r1mega.train.grpo import sample_and_score
    from r1mega.train.rewarders import TrainingRewarder

    transfer = role.transfer
    setup = transfer.broadcast_object(None, src=0)
    tokenizer = HFTokenizer(setup["tokenizer_dir"])
    engine = build_engine(setup["hf_dir"], cfg.rollout, in_process=False, env=engine_env or {})
    rewarder = TrainingRewarder(cfg.reward, cfg.rollout.max_new_tokens)
    prompts, order, per_step = setup["prompts"], setup["order"], setup["prompts_per_step"]
    R = len(role.engine_src)
    version = 0
    try:
        for step in range(steps):
            mine = _step_prompts(prompts, order, step, per_step)[role.engine_index::R]
            gens, rewards, t_roll, t_rew, errors = sample_and_score(
                engine, rewarder, mine, cfg.rollout.n, _sampling(cfg, tokenizer.eos_id, step), tokenizer, step + 1)
            for g in gens:
                g.policy_version = version
            for src in role.engine_src:  # every engine's share, in engine order
                transfer.broadcast_object((gens, rewards, t_roll, t_rew, errors) if src == transfer.rank else None, src)
            if step >= 1:  # v_step arrives after batch `step` left (the learner trains it meanwhile)
                engine.update_weights(receive_weights(transfer))
                version = step
        engine.update_weights(receive_weights(transfer))  # final weights (v_steps): the engine ends in sync
        for src in role.engine_src:  # parity probe: the pushed weights are the learner's
            transfer.broadcast_object(engine.prompt_logprobs(setup["probe"]) if src == transfer.rank else None, src)
    finally:
        engine.close()
        rewarder.close()


# ----------------------------------------------------------------------------- learner ranks


def apply_staleness_bound(batch, staleness: list[int], max_staleness: int) -> list[int]:
    """Leave samples staler than ``max_staleness`` out of the loss; returns their indices.

    With this loop's schedule staleness is 0 (first batch) or 1; the bound guards the contract (TIS is
    only a good correction for small policy lags) should a schedule or engine run further ahead.
    """
    dropped = [i for i, s in enumerate(staleness) if s > max_staleness]
    for i in dropped:
        batch.loss_mask[i] = 0.0
    return dropped


def run_one_step_off(cfg, role: Role, tm, tokenizer, prompts: list, *, steps: int, prompts_per_step: int,
                     out_dir: Path, hf_dir: Path, tokenizer_dir: Path) -> dict:
    """Learner ranks: ``steps`` GRPO steps on one-step-stale rollouts; returns ``{"history": [...]}``."""
    from r1mega.bridge.export import export_hf_buckets
    from r1mega.platform.distributed import broadcast_from_rank0
    from r1mega.rl.learner import LearnerBatch, LearnerSettings, compute_logprobs, learner_step, prepare_routing_replay
    from r1mega.rollout import compare, probe_batch
    from r1mega.train.grpo import build_batch

    from megatron.core import parallel_state

    rl, n = cfg.rl, cfg.rollout.n
    settings = LearnerSettings(micro_batch_size=cfg.parallel.micro_batch_size, valid_vocab=cfg.model.vocab_size,
                               temperature=cfg.rollout.temperature)
    transfer = role.transfer  # learner rank 0 only
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.data.seed)).tolist()
    dp = parallel_state.get_data_parallel_world_size()
    probe = probe_batch(cfg.model.vocab_size, batch=2 * dp, length=cfg.rollout.parity_probe_length, seed=1)
    if transfer is not None:
        transfer.broadcast_object({"hf_dir": str(hf_dir), "tokenizer_dir": str(tokenizer_dir), "prompts": prompts,
                                   "order": order, "prompts_per_step": prompts_per_step, "probe": probe}, src=0)
    bucket_bytes = int(cfg.rollout.refit_bucket_mb * 2**20)
    metrics_path = Path(out_dir) / "metrics.jsonl"
    history = []
    for step in range(steps):
        t0 = time.monotonic()
        rollout = None
        if transfer is not None:
            parts = [transfer.broadcast_object(None, src) for src in role.engine_src]
            rollout = ([g for p in parts for g in p[0]], [r for p in parts for r in p[1]],
                       max(p[2] for p in parts), max(p[3] for p in parts), sum(p[4] for p in parts))
        gens, rewards, t_rollout, t_reward, reward_errors = broadcast_from_rank0(rollout)
        t_wait = time.monotonic() - t0
        t_push = 0.0
        if step >= 1:  # v_step to the engines, which generate batch step+1 with it while we train
            t1 = time.monotonic()
            send_weights(transfer, export_hf_buckets(tm.module, tm.config, cfg.model, bucket_bytes), step)
            t_push = time.monotonic() - t1
        staleness = [step - g.policy_version for g in gens]
        batch = build_batch(gens, rewards, n, tokenizer.pad_id, rl, multiple=cfg.parallel.tp)
        dropped = apply_staleness_bound(batch, staleness, cfg.rollout.max_staleness)
        t1 = time.monotonic()
        routing_metrics = prepare_routing_replay(tm, batch, settings, rl.routing_replay)
        m = learner_step(tm, batch, settings, rl)
        t_train = time.monotonic() - t1
        v = m.values
        record = {
            "stage": "grpo_one_step_off", "step": step + 1, "reward/mean": sum(rewards) / len(rewards),
            "reward/errors": reward_errors,
            "loss": v.get("loss", 0.0), "grad_norm": m.grad_norm, "skipped": m.skipped,
            "logprob_mismatch": v.get("mismatch_abs_mean", 0.0), "tis_clip_frac": v.get("tis_clip_frac", 0.0),
            "staleness": staleness, "staleness/mean": sum(staleness) / len(staleness),
            "staleness/max": max(staleness), "staleness/dropped": len(dropped),
            "time/wait_rollout": t_wait, "time/push": t_push, "time/train": t_train,
            "time/engine_rollout": t_rollout, "time/engine_reward": t_reward, "time/step": time.monotonic() - t0,
            **routing_metrics,
        }
        history.append(record)
        if role.world.rank == 0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            log.info("one-step-off step %d reward %.3f staleness %s waited %.1fs trained %.1fs", step + 1,
                     record["reward/mean"], sorted(set(staleness)), t_wait, t_train)
    send_weights(transfer, export_hf_buckets(tm.module, tm.config, cfg.model, bucket_bytes), steps)
    tokens = torch.tensor(probe)
    trainer = compute_logprobs(tm.ddp, tm.module, LearnerBatch(tokens, torch.ones(tokens.size(0), tokens.size(1) - 1)),
                               dataclasses.replace(settings, micro_batch_size=1, temperature=1.0))
    parity = None
    if transfer is not None:  # worst engine
        reports = [compare(transfer.broadcast_object(None, src), trainer) for src in role.engine_src]
        parity = max(r.max_abs for r in reports)
    return {"history": history, "final_parity_max_abs": parity}
