"""Per-token clipped policy-gradient losses, picked by name; aggregation is ``rl.aggregation``'s job.

Inputs are per-token tensors of one shape (``[T]`` packed or ``[B, S]``); ``mask`` is 1 on response
tokens. Outputs are the per-token loss (0 on masked tokens, computed in float32) and detached 0-dim
metrics, each a mean over this call's masked tokens (weight by ``mask.sum()`` to combine calls).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from r1mega.config.schema import RLConfig
from r1mega.rl.registry import Registry

Metrics = dict[str, Tensor]
PolicyLossFn = Callable[..., tuple[Tensor, Metrics]]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")
# log-ratios are clamped before exp(), as verl: exp(20) ~ 5e8 is finite in fp32 and, being far
# outside any clip range, is clipped anyway (zero gradient), so the clamp changes no gradient that matters.
LOG_RATIO_CLAMP = 20.0


def register_policy_loss(*names: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """``@register_policy_loss("name")``: fn(logp, old_logp, advantages, mask: bool, *, eps_low, eps_high,
    dual_clip_c, seq_ids, seq_group) -> (per_token_loss, metrics); inputs are already float32 and 0 on
    masked tokens. ``seq_group``: the process group whose ranks hold the other parts of each sequence
    (context parallelism), for sequence-level statistics; None = all of it is here."""
    return POLICY_LOSSES.register(*names)


def policy_loss(name: str, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                eps_low: float, eps_high: float, dual_clip_c: Optional[float] = None,
                seq_ids: Optional[Tensor] = None, tis_weights: Optional[Tensor] = None,
                seq_group=None) -> tuple[Tensor, Metrics]:
    """Per-token loss of ``name`` times ``tis_weights`` (truncated IS, ``rl.mismatch``), 0 where masked.

    Masked positions are replaced by 0 *before* any arithmetic, so garbage (inf/NaN) logprobs on
    padding can reach neither the loss nor the gradient.
    """
    if not (logp.shape == old_logp.shape == advantages.shape == mask.shape):
        raise ValueError(f"logp, old_logp, advantages, mask must share one shape; got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(advantages.shape)}, {tuple(mask.shape)}")
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (Ye et al. 2020 use 3), got {dual_clip_c}")
    m = mask > 0
    logp, old_logp, advantages = (_masked_float(x, m) for x in (logp, old_logp, advantages))
    loss, metrics = POLICY_LOSSES.get(name)(logp, old_logp, advantages, m, eps_low=eps_low, eps_high=eps_high,
                                            dual_clip_c=dual_clip_c, seq_ids=seq_ids, seq_group=seq_group)
    if tis_weights is not None:
        loss = loss * _masked_float(tis_weights.detach(), m)
    return torch.where(m, loss, torch.zeros_like(loss)), metrics


def clip_range(cfg: RLConfig) -> tuple[float, float]:
    """(eps_low, eps_high) for ``cfg.policy_loss``: gspo clips a sequence-level ratio, so it has its own
    ~1000x tighter epsilons (GSPO paper: 3e-4 / 4e-4); PPO-style losses use eps_clip_low/high."""
    if cfg.policy_loss == "gspo":
        return cfg.gspo_eps_clip_low, cfg.gspo_eps_clip_high
    return cfg.eps_clip_low, cfg.eps_clip_high


def entropy_bonus(entropy: Tensor, coef: float) -> Tensor:
    """Per-token ``-coef * entropy``: added to the policy loss it rewards exploration (verl's entropy_coeff)."""
    return -coef * entropy


# --------------------------------------------------------------------------- shared pieces


def _masked_float(x: Tensor, m: Tensor) -> Tensor:
    x = x.float()
    return torch.where(m, x, torch.zeros_like(x))


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over ``mask`` (detached, 0-dim); 0 when nothing is masked in."""
    m = mask.to(torch.float32)
    return ((x.detach().float() * m).sum() / m.sum().clamp(min=1.0)).detach()


def clipped_surrogate(ratio: Tensor, adv: Tensor, mask: Tensor, eps_low: float, eps_high: float,
                      dual_clip_c: Optional[float]) -> tuple[Tensor, Metrics]:
    """PPO-clip (Schulman et al. 2017) with DAPO's asymmetric clip-higher (Yu et al. 2025) and dual-clip.

    loss = max(-A r, -A clip(r, 1-eps_low, 1+eps_high)); for A < 0 dual-clip (Ye et al. 2020) caps it
    at -c A, bounding the push-down of tokens whose ratio exploded. Clipped tokens get zero gradient.
    """
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high))
    high = (adv > 0) & (ratio > 1.0 + eps_high)
    low = (adv < 0) & (ratio < 1.0 - eps_low)
    dual = torch.zeros_like(high)
    if dual_clip_c is not None:
        cap = -dual_clip_c * adv
        dual = (adv < 0) & (loss > cap)
        loss = torch.where(adv < 0, torch.minimum(loss, cap), loss)
    metrics = {
        "clip_frac_low": masked_mean(low, mask),
        "clip_frac_high": masked_mean(high, mask),
        "clip_frac": masked_mean(low | high, mask),
        "dual_clip_frac": masked_mean(dual, mask),
    }
    return loss, metrics


# --------------------------------------------------------------------------- losses


@register_policy_loss("ppo")
def ppo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, eps_low: float,
             eps_high: float, dual_clip_c: Optional[float] = None,
             seq_ids: Optional[Tensor] = None, seq_group=None) -> tuple[Tensor, Metrics]:
    """Token-level PPO-clip: ratio_t = exp(logp_t - old_t) (verl: ``vanilla``)."""
    del seq_ids, seq_group
    log_ratio = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    loss, metrics = clipped_surrogate(torch.exp(log_ratio), advantages, mask, eps_low, eps_high, dual_clip_c)
    metrics["approx_kl"] = masked_mean(old_logp - logp, mask)
    return loss, metrics


def sequence_mean(x: Tensor, seq_ids: Tensor, valid: Tensor, group=None) -> Tensor:
    """Per token, the mean of ``x`` over the valid tokens of its sequence (0 on invalid tokens).

    ``seq_ids`` are non-negative ints naming each token's sequence; works for packed rows
    (index_add over sequence ids, no assumption that a sequence is one row). Differentiable in ``x``,
    except with ``group`` (the context-parallel ranks holding the rest of every sequence): then the
    per-sequence sums are all-reduced over it and the result is a constant.
    """
    flat_ids = torch.where(valid, seq_ids, torch.zeros_like(seq_ids)).reshape(-1).long()
    flat_x, flat_valid = x.reshape(-1), valid.reshape(-1)
    num = int(flat_ids.max()) + 1 if flat_ids.numel() else 0
    if group is not None:
        top = torch.tensor([num], dtype=torch.long, device=x.device)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        num = int(top)
    sums = x.new_zeros(num).index_add(0, flat_ids[flat_valid], flat_x[flat_valid])
    counts = x.new_zeros(num).index_add(0, flat_ids[flat_valid], torch.ones_like(flat_x[flat_valid]))
    if group is not None:
        both = torch.stack([sums.detach(), counts])
        dist.all_reduce(both, group=group)
        sums, counts = both[0], both[1]
    per_tok = (sums / counts.clamp(min=1.0))[flat_ids].reshape(x.shape)
    return torch.where(valid, per_tok, torch.zeros_like(per_tok))


def _default_seq_ids(shape: torch.Size, device: torch.device, seq_ids: Optional[Tensor]) -> Tensor:
    if seq_ids is not None:
        if seq_ids.shape != shape:
            raise ValueError(f"seq_ids must have the tokens' shape {tuple(shape)}, got {tuple(seq_ids.shape)}")
        return seq_ids
    if len(shape) != 2:
        raise ValueError("gspo needs seq_ids for packed [T] tokens (row index is used only for [B, S] inputs)")
    return torch.arange(shape[0], device=device)[:, None].expand(shape)


@register_policy_loss("gspo")
def gspo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, eps_low: float,
              eps_high: float, dual_clip_c: Optional[float] = None,
              seq_ids: Optional[Tensor] = None, seq_group=None) -> tuple[Tensor, Metrics]:
    """GSPO-token (Zheng et al. 2025): ratio_t = sg(s_i) * exp(logp_t - sg(logp_t)), s_i = exp(mean_t log r).

    Every token of sequence i has the value s_i (one clip decision per sequence) and gradient
    s_i * grad logp_t; with ``seq-mean-token-mean`` aggregation this is exactly the gradient of the
    sequence-level objective. Use GSPO's small epsilons (paper: 3e-4 / 4e-4), not PPO's 0.2.
    ``seq_ids`` (-1 = padding) default to the row index for ``[B, S]`` inputs.
    """
    ids = _default_seq_ids(logp.shape, logp.device, seq_ids)
    valid = mask & (ids >= 0)
    log_s = sequence_mean(logp - old_logp, ids, valid, group=seq_group).detach()
    log_s = torch.clamp(log_s, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_s + logp - logp.detach())
    loss, metrics = clipped_surrogate(ratio, advantages, valid, eps_low, eps_high, dual_clip_c)
    metrics["approx_kl"] = masked_mean(old_logp - logp, valid)
    return torch.where(valid, loss, torch.zeros_like(loss)), metrics
