"""Refit parity health check: engine prompt log-probs vs the trainer's on a fixed probe batch.

A silent refit bug (a dropped expert, a mis-ordered q/k/v, a stale repacked MoE buffer) does not crash
anything; it just makes every rollout come from a different policy than the one being trained. After
a refit (every ``interval`` refits) :class:`ParityChecker` scores a fixed probe batch with both sides
and reports mean/max |Δ log p| as metrics; above ``max_abs_logp`` it raises :class:`ParityError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

log = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """The engine's log-probs disagree with the trainer's after a weight update."""


@dataclass
class ParityReport:
    mean_abs: float
    max_abs: float
    tokens: int
    refit: int = 0  # which refit this was measured after

    def metrics(self, prefix: str = "rollout/parity_") -> dict[str, float]:
        return {f"{prefix}mean_abs_logp": self.mean_abs, f"{prefix}max_abs_logp": self.max_abs,
                f"{prefix}tokens": float(self.tokens)}


def probe_batch(vocab_size: int, batch: int = 4, length: int = 32, seed: int = 0,
                low: int = 0) -> list[list[int]]:
    """Fixed random token sequences (same on every rank and every call for the same arguments)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab_size, (batch, length), generator=gen).tolist()


def compare(engine: Sequence[Sequence[float]], trainer: torch.Tensor, refit: int = 0,
            mask: Optional[torch.Tensor] = None) -> ParityReport:
    """``engine[i]``: log p of tokens 1..L_i-1 of sequence i; ``trainer``: [B, S-1] (rows may be longer
    than the sequence; only the first L_i-1 columns count, and ``mask`` [B, S-1] can drop more)."""
    diffs = []
    for i, row in enumerate(engine):
        e = torch.tensor(row, dtype=torch.float64)
        t = trainer[i, : e.numel()].double()
        d = (e - t).abs()
        if mask is not None:
            d = d[mask[i, : e.numel()].bool()]
        diffs.append(d)
    d = torch.cat(diffs) if diffs else torch.zeros(0, dtype=torch.float64)
    if d.numel() == 0:
        raise ValueError("parity probe compared no tokens")
    if not torch.isfinite(d).all():
        return ParityReport(float("inf"), float("inf"), d.numel(), refit)
    return ParityReport(float(d.mean()), float(d.max()), d.numel(), refit)


class ParityChecker:
    """Run the probe after every ``interval``-th refit (0 = never); raise above ``max_abs_logp``.

    ``trainer_logprobs(token_ids) -> [B, S-1] tensor`` is collective on a multi-rank learner: call
    :meth:`due` on every rank and, when it is true, :meth:`check` on every rank (only the ranks that
    own an engine pass one; the others pass ``engine=None`` and get ``None`` back).
    """

    def __init__(self, probe: Sequence[Sequence[int]], interval: int = 1, max_abs_logp: float = 1e-2):
        self.probe = [list(map(int, p)) for p in probe]
        self.interval = int(interval)
        self.max_abs_logp = float(max_abs_logp)
        self.refits = 0
        self.last: Optional[ParityReport] = None

    def note_refit(self) -> bool:
        """Count a refit; returns whether the probe is due now."""
        self.refits += 1
        return self.due()

    def due(self) -> bool:
        return self.interval > 0 and self.refits > 0 and self.refits % self.interval == 0

    def check(self, engine, trainer_logprobs: Callable[[list[list[int]]], torch.Tensor]) -> Optional[ParityReport]:
        trainer = trainer_logprobs(self.probe)
        if engine is None:
            return None
        report = compare(engine.prompt_logprobs(self.probe), trainer, refit=self.refits)
        self.last = report
        log.info("rollout parity after refit %d: mean |dlogp| %.3g, max %.3g over %d tokens",
                 report.refit, report.mean_abs, report.max_abs, report.tokens)
        if not report.max_abs <= self.max_abs_logp:
            raise ParityError(
                f"engine vs trainer log-prob mismatch after refit {report.refit}: max |dlogp| "
                f"{report.max_abs:.3g} > {self.max_abs_logp:g} (mean {report.mean_abs:.3g}, {report.tokens} "
                "tokens). The weights the engine samples with are not the trained ones: check the bridge "
                "mapping and the refit path (fused MoE repack, whole-module pushes) before training on.")
        return report
