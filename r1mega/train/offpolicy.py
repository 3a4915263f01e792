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
take the final weights and answer the parity probe; mid-stage, they answer it right after taking ``v_j``
for every ``j`` that is a multiple of ``rollout.parity_check_interval`` (both sides know when, so the
probe needs no extra message), as colocated engines do after the refit of step ``j``. Rewards are
computed on the engine ranks. Engine ``e`` of ``R`` samples the step's prompts ``e, e + R, ...``
(round-robin, as colocated engines do), the prompt at index ``i`` with the seed ``seed + i``, so the
samples do not depend on the engine count.

A stage that ends early on the learners (a stop signal's checkpoint, a learner error) first brings the
exchange to a message boundary: learner rank 0 takes the batch the engines are sending, if any, then
sends an abort marker where they wait for weights; the engines end the stage and, like after a finished
one, wait for the next set-up message, which is then ``no more stages``. Learners and engines exit
promptly (a mismatched exchange would block both until the transfer group's timeout). An engine that
fails reports it in its batch and every engine rank stops; the learners then send nothing more.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterator, Optional

import torch

from r1mega.platform.disaggregated import Role, TransferGroup
from r1mega.platform.distributed import broadcast_from_rank0
from r1mega.train.grpo import GRPORun, Rollout
from r1mega.train.weight_sync import RolloutFailure, raise_any

log = logging.getLogger(__name__)

_END = "end-of-weights"
_DONE = "no-more-stages"
_ABORT = "stage-aborted"  # in place of a weights push: the learners ended the stage early


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
            transfer.broadcast(torch.cat(flat[dtype]).cpu(), src=0)  # host buffers: the transfer group is gloo
    if transfer is not None:
        transfer.broadcast_object((_END, version), src=0)


def receive_weights(transfer: TransferGroup, meta=None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Engines: the buckets of one push, as ``(HF name, tensor)`` lists (feed to ``engine.update_weights``);
    ``meta``: the push's first message, when the caller has already received it."""
    while True:
        if meta is None:
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
        meta = None
        yield bucket


def push_weights(tr, version: int) -> None:
    """Learners (collective export): the current weights to every engine rank."""
    from r1mega.bridge.export import export_hf_buckets

    cfg = tr.cfg
    send_weights(tr.role.transfer, export_hf_buckets(tr.tm.module, tr.tm.config, cfg.model,
                                                     int(cfg.rollout.refit_bucket_mb * 2**20)), version)


# ----------------------------------------------------------------------------- engine ranks


class _StageAborted(Exception):
    """The learners ended the stage before its last step (engine side)."""


def probe_due(version: int, interval: int) -> bool:
    """Whether the engines answer the parity probe after taking ``v_version`` (``interval`` 0: never mid-stage)."""
    return bool(interval) and version % interval == 0


def _answer_probe(engine, transfer: TransferGroup, engine_src: list[int], probe) -> None:
    """Engines: every engine's log-probs of the probe batch under the weights it holds, in engine order."""
    for src in engine_src:
        transfer.broadcast_object(engine.prompt_logprobs(probe) if src == transfer.rank else None, src)


def _take_weights(engine, transfer: TransferGroup) -> None:
    """Engines: load the next push, or raise :class:`_StageAborted` if the learners send the abort marker."""
    head = transfer.broadcast_object(None, src=0)
    if head == _ABORT:
        raise _StageAborted()
    engine.update_weights(receive_weights(transfer, head))


def serve_engine(cfg, role: Role, engine_env: Optional[dict] = None) -> None:
    """An engine rank: serve every GRPO stage the learners announce, until they say there are no more."""
    from dataclasses import replace

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
        share = list(range(role.engine_index, per_step, len(role.engine_src)))  # indices into a step's prompts
        version = first - 1
        try:
            for step in range(first, last + 1):
                start = consumed + (step - first) * per_step
                mine = [prompts[order[(start + i) % len(prompts)]] for i in share]
                sampling = step_sampling(scfg, tokenizer.eos_id, step)
                if sampling.seed is not None:  # the step's prompt i gets seed + i, as on a single engine
                    sampling = replace(sampling, prompt_seeds=tuple(sampling.seed + i for i in share))
                try:
                    gens, rewards, t_roll, t_rew, errors = sample_and_score(
                        engine, rewarder, mine, scfg.rollout.n, sampling, tokenizer, step)
                    for g in gens:
                        g.prompt_index = share[g.prompt_index]
                        g.policy_version = version
                    mine_out = ("ok", gens, rewards, t_roll, t_rew, errors)
                except RolloutFailure as e:
                    mine_out = ("error", str(e))
                outs = [transfer.broadcast_object(mine_out if src == transfer.rank else None, src)
                        for src in role.engine_src]  # every engine's share, in engine order
                failed = [o[1] for o in outs if o[0] == "error"]
                if failed:  # every engine rank stops (the learners raise it too)
                    raise RolloutFailure(failed[0])
                if step > first:  # v_{step-1} arrives after batch `step` left (the learners train it meanwhile)
                    _take_weights(engine, transfer)
                    version = step - 1
                    if probe_due(version, scfg.rollout.parity_check_interval):
                        _answer_probe(engine, transfer, role.engine_src, setup["probe"])
            _take_weights(engine, transfer)  # the final weights: the engine ends in sync
            _answer_probe(engine, transfer, role.engine_src, setup["probe"])  # the pushed weights are the learner's
        except _StageAborted:
            log.warning("engine rank %d: the learners ended the stage before step %d; waiting for their next message",
                        role.engine_index, last)
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


# What learner rank 0 owes the engines next (they block on it): nothing (between stages, or the exchange
# broke off mid-message: say nothing more), take their batch, send weights, take their probe answers.
_IDLE, _BROKEN, _BATCH, _WEIGHTS, _PROBE = "idle", "broken", "batch", "weights", "probe"


class OneStepOff:
    """The learners' side: batches arrive from the engine ranks; weights leave one step behind."""

    colocated = False  # the engines have devices of their own

    def __init__(self, tr):
        self.tr = tr
        self.pending = False  # the last update's weights, pushed after the next batch arrived
        self.state = _IDLE
        self.after_probe = _IDLE  # what the engines do once they have answered the probe

    def start(self, run: GRPORun, first_step: int, last_step: int) -> None:
        """Collective: export the stage's starting weights for the engines and announce the stage to them."""
        from r1mega.bridge.hf_dir import save_hf
        from r1mega.rollout import probe_batch

        tr, cfg = self.tr, run.cfg
        self.first, self.last = first_step, last_step
        hf_dir = tr.out / run.stage_name / "engine_hf"
        save_hf(tr.tm.module, tr.tm.config, cfg.model, hf_dir, tokenizer_dir=tr.tok_dir)
        self.probe = probe_batch(cfg.model.vocab_size, batch=cfg.rollout.parity_probe_batch,
                                 length=cfg.rollout.parity_probe_length, seed=1)
        if tr.role.transfer is not None:
            self.state = _BROKEN
            tr.role.transfer.broadcast_object(
                {"cfg": cfg, "hf_dir": str(hf_dir), "tokenizer_dir": str(tr.tok_dir), "prompts": run.prompts,
                 "order": run.order, "per_step": run.per_step, "consumed_samples": run.consumed_samples,
                 "first_step": first_step, "last_step": last_step, "probe": self.probe}, src=0)
            self.state = _BATCH if first_step <= last_step else _WEIGHTS  # resumed after its last step: the push

    def _receive(self, step: int):
        """Learner rank 0: every engine's share of batch ``step``; raises what an engine reported."""
        role = self.tr.role
        self.state = _BROKEN  # until every share is in
        parts = [role.transfer.broadcast_object(None, src) for src in role.engine_src]
        errors = [p[1] for p in parts if p[0] == "error"]
        if errors:  # the engine ranks stop on it too
            raise RolloutFailure(f"{errors[0]} (reported by an engine rank)")
        # after batch `step` the engines wait for v_{step-1}, else generate the next batch, else take the final push
        self.state = _WEIGHTS if step > self.first or step == self.last else _BATCH
        return ([g for p in parts for g in p[1]], [r for p in parts for r in p[2]], max(p[3] for p in parts),
                max(p[4] for p in parts), sum(p[5] for p in parts))

    def rollout(self, run: GRPORun, step: int) -> Rollout:
        import time

        from r1mega.train.schedules import dynamic_sampling

        tr = self.tr
        t0 = time.monotonic()
        got, error = None, None
        if tr.rank == 0:
            try:
                got = self._receive(step)
            except Exception as e:  # noqa: BLE001 - reported to every learner rank below
                error = str(e) if isinstance(e, RolloutFailure) else f"{type(e).__name__}: {e}"
        raise_any(error)
        gens, rewards, t_roll, t_rew, errors = broadcast_from_rank0(got)
        order = sorted(range(len(gens)), key=lambda i: (gens[i].prompt_index, gens[i].sample_index))
        batch = ([gens[i] for i in order], [rewards[i] for i in order], t_roll, t_rew, errors)
        # DAPO's filter on the batch as sampled (refill_policy=resample, which samples more, is refused in this mode)
        rollout = dynamic_sampling(run, step, lambda prompts, round_: batch)
        metrics = rollout.metrics
        metrics["time/wait_engines"] = time.monotonic() - t0
        if self.pending:  # v_{step-1}: the engines generate batch step+1 with it while we train
            t1 = time.monotonic()
            self.state = _BROKEN
            push_weights(tr, step - 1)
            self.state = _BATCH if step < self.last else _WEIGHTS
            metrics["time/push"] = time.monotonic() - t1
            self.pending = False
            if probe_due(step - 1, run.cfg.rollout.parity_check_interval):
                metrics.update(self._probe(run, f"{run.stage_name} step {step - 1}", then=self.state))
        staleness = [step - 1 - g.policy_version for g in rollout.gens]
        dropped = apply_staleness_bound(rollout, staleness, run.cfg.rollout.max_staleness)
        metrics.update({"staleness/mean": sum(staleness) / len(staleness), "staleness/max": max(staleness),
                        "staleness/dropped": len(dropped)})
        return rollout

    def after_update(self, run: GRPORun, step: int) -> dict:
        self.pending = True
        return {}

    def finish(self, run: GRPORun, last_step: int) -> dict:
        """After the stage's last step: the final weights to the engines, then the parity probe (collective)."""
        self.state = _BROKEN
        push_weights(self.tr, last_step)
        return self._probe(run, f"{run.stage_name}: after the final weights push", then=_IDLE)

    def _probe(self, run: GRPORun, what: str, then: str) -> dict:
        """Collective: the engines' log-probs of the probe batch (they answer right after taking weights) vs
        the learners' under the same weights; a mismatch above ``rollout.parity_max_abs_logp`` raises (the
        engines sample other weights than the trained ones). ``then``: what the engines do next."""
        from r1mega.rl.learner import LearnerBatch, compute_logprobs
        from r1mega.rollout import ParityError, compare

        tr = self.tr
        self.state, self.after_probe = _PROBE, then
        tokens = torch.tensor(self.probe)
        trainer = compute_logprobs(tr.tm.ddp, tr.tm.module, LearnerBatch(tokens, torch.ones(tokens.size(0),
                                                                                          tokens.size(1) - 1)),
                                   dataclasses.replace(run.settings, micro_batch_size=1, temperature=1.0))
        report = None
        if tr.role.transfer is not None:  # the worst engine
            self.state = _BROKEN
            reports = [compare(tr.role.transfer.broadcast_object(None, src), trainer) for src in tr.role.engine_src]
            self.state = then
            report = {"parity/max_abs_logp": max(r.max_abs for r in reports),
                      "parity/mean_abs_logp": max(r.mean_abs for r in reports), "parity/engines": len(reports)}
        report = broadcast_from_rank0(report)
        self.state = then
        limit = run.cfg.rollout.parity_max_abs_logp
        if not report["parity/max_abs_logp"] <= limit:
            raise ParityError(f"{what}: the engine ranks' log-probs differ from the learners' by max "
                              f"{report['parity/max_abs_logp']:.3g} > rollout.parity_max_abs_logp={limit:g}: the "
                              "engines sampled with other weights than the trained ones; check the bridge mapping "
                              "and the weights transfer")
        return report

    def close(self) -> None:
        """Learner rank 0, after a stage that ended early: bring the engines to the end of the stage (see the
        module docstring); after a broken exchange, mark them unreachable (the run ends, nothing more is sent)."""
        role = self.tr.role
        if role.transfer is None or self.state == _IDLE:
            return
        try:
            if self.state == _PROBE:  # take the probe answers; the engines then go on as they would have
                self.state = _BROKEN
                for src in role.engine_src:
                    role.transfer.broadcast_object(None, src)
                self.state = self.after_probe
            if self.state == _BATCH:  # the batch the engines are sending; they stop by themselves if one failed
                self.state = _BROKEN
                parts = [role.transfer.broadcast_object(None, src) for src in role.engine_src]
                if all(p[0] == "ok" for p in parts):
                    self.state = _WEIGHTS
            if self.state == _WEIGHTS:  # they wait for weights: the abort marker instead
                self.state = _BROKEN
                role.transfer.broadcast_object(_ABORT, src=0)
                self.state = _IDLE
                log.warning("the stage ended before its last step: the engine ranks were told to end it too")
        except Exception as e:  # noqa: BLE001 - the error that ended the stage is the one to raise
            log.error("could not bring the engine ranks to the end of the stage (%s: %s): they stop when this "
                      "process exits", type(e).__name__, e)
        finally:
            role.engines_reachable = self.state == _IDLE


def release_engines(role: Optional[Role]) -> None:
    """Learner rank 0, at the end of a run: tell the engine ranks that no stage follows."""
    if role is not None and role.transfer is not None and role.engines_reachable:
        role.transfer.broadcast_object(_DONE, src=0)
