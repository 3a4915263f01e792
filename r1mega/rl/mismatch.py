"""Rollout-engine vs trainer logprob mismatch: truncated importance sampling (TIS) and its metrics.

Why: vLLM and the megatron learner compute different logprobs for the same tokens (kernels,
precision, MoE routing), so "on-policy" samples are slightly off-policy. TIS reweights each token
by min(pi_trainer_old / pi_rollout, C) (Yao et al. 2025, "Your efficient RL framework secretly
brings you off-policy RL training"; verl's ``tis_imp_ratio_cap``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from r1mega.rl.kl import kl_penalty
from r1mega.rl.policy_loss import LOG_RATIO_CLAMP, masked_mean


def _log_ratio(trainer_logp: Tensor, rollout_logp: Tensor, m: Tensor) -> Tensor:
    diff = trainer_logp.detach().float() - rollout_logp.detach().float()
    diff = torch.where(m, diff, torch.zeros_like(diff))
    return torch.clamp(diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def tis_weights(trainer_old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, cap: Optional[float]) -> Tensor:
    """Per-token detached ``min(exp(old - rollout), cap)``, 0 on masked tokens; ``cap=None``: untruncated IS.

    Pass the result as ``policy_loss(..., tis_weights=...)``; it must be a constant (no gradient).
    """
    m = mask > 0
    w = torch.exp(_log_ratio(trainer_old_logp, rollout_logp, m))
    if cap is not None:
        w = torch.clamp(w, max=cap)
    return torch.where(m, w, torch.zeros_like(w))


def mismatch_metrics(trainer_logp: Tensor, rollout_logp: Tensor, mask: Tensor,
                     cap: Optional[float] = None) -> dict[str, Tensor]:
    """Detached 0-dim metrics over masked tokens: mean/max |dlogp|, KL(rollout || trainer) by k3
    (samples come from the rollout policy), and with ``cap`` the fraction of TIS weights truncated."""
    m = mask > 0
    diff = _log_ratio(trainer_logp, rollout_logp, m)
    absdiff = diff.abs()
    rollout, trainer = (torch.where(m, x.detach().float(), torch.zeros_like(diff))
                        for x in (rollout_logp, trainer_logp))
    kl = kl_penalty(rollout, trainer, "k3")  # logp = sampling policy (rollout), ref = trainer
    out = {
        "mismatch_abs_mean": masked_mean(absdiff, m),
        "mismatch_abs_max": absdiff.max().detach() if absdiff.numel() else absdiff.new_zeros(()),
        "mismatch_kl": masked_mean(kl, m),
    }
    if cap is not None:
        out["tis_clip_frac"] = masked_mean(torch.exp(diff) > cap, m)
    return out
