"""Refit parity health check: engine prompt log-probs vs the trainer's on a fixed probe batch.

A silent refit bug (a dropped expert, a mis-ordered q/k/v, a stale repacked MoE buffer) does not crash
anything; it just makes every rollout come from a different policy than the one being trained. After
a refit the trainer (``train/weight_sync.py``) scores a fixed probe batch with both sides and reports
mean/max |Δ log p| as metrics; above ``rollout.parity_max_abs_logp`` :func:`check_parity` raises
:class:`ParityError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

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


def check_parity(report: ParityReport, max_abs_logp: float, what: str = "refit") -> ParityReport:
    """``report`` if the engine agrees with the trainer within ``max_abs_logp``, else :class:`ParityError`
    (NaN fails too). Call it on every rank with the same report, so every rank stops together."""
    log.debug("rollout parity after %s: mean |dlogp| %.3g, max %.3g over %d tokens", what, report.mean_abs,
             report.max_abs, report.tokens)
    if not report.max_abs <= max_abs_logp:
        raise ParityError(
            f"{what}: engine vs trainer log-prob mismatch: max |dlogp| {report.max_abs:.3g} > "
            f"rollout.parity_max_abs_logp={max_abs_logp:g} (mean {report.mean_abs:.3g}, {report.tokens} tokens). The "
            "engine samples with other weights than the trained ones: check the bridge mapping and the refit path "
            "(fused MoE repack, whole-module pushes) before training on.")
    return report
