"""Loss aggregation that is invariant to how the global batch is cut into micro-batches and DP ranks.

Why: normalising each micro-batch by its own token count (the naive ``masked_mean`` per micro-batch)
makes the loss depend on the split, so changing micro_batch_size or DP size changes training (a
known verl/TRL pitfall). Here the normaliser is folded into per-token weights computed ONCE on the
global batch; every micro-batch then contributes the plain sum ``(loss * weights).sum()`` of its
tokens, and the learner undoes megatron's averaging with ``split_scale``.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def token_weights(mask: Tensor, mode: str, constant_norm: float | None = None) -> Tensor:
    """Weights [B, S] over the *global* batch so that the global loss is ``(loss * weights).sum()``.

    - ``token-mean``: 1 / (masked tokens in the batch) (DAPO; verl's default).
    - ``seq-mean-token-sum``: 1 / B, B counting every row, even empty ones (verl's mean over rows).
    - ``seq-mean-token-mean``: 1 / (len_i * B) (GRPO paper; GSPO), B as above.
    - ``seq-mean-token-sum-norm``: 1 / (B * constant_norm) (Dr.GRPO: a constant, e.g. the rollout's
      max_new_tokens, so no length bias). ``constant_norm`` is required: the padded width S varies
      from batch to batch and would not be a constant.

    Rows with no masked token get weight 0 in every mode, never NaN.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, S], got shape {tuple(mask.shape)}")
    m = (mask > 0).to(torch.float32)
    rows = max(mask.shape[0], 1)
    if mode == "token-mean":
        return m / m.sum().clamp(min=1.0)
    if mode == "seq-mean-token-sum":
        return m / rows
    if mode == "seq-mean-token-mean":
        return m / (m.sum(dim=1, keepdim=True).clamp(min=1.0) * rows)
    if mode == "seq-mean-token-sum-norm":
        if constant_norm is None or constant_norm <= 0:
            raise ValueError("seq-mean-token-sum-norm needs constant_norm > 0 (rl.dr_grpo_norm_length, "
                             f"default rollout.max_new_tokens); got {constant_norm}")
        return m / (rows * float(constant_norm))
    raise ValueError(f"unknown loss_agg_mode {mode!r}: choose one of {LOSS_AGG_MODES}")


def aggregate(per_token_loss: Tensor, weights: Tensor) -> Tensor:
    """Scalar ``sum(loss * weights)``; zero-weight tokens are dropped first so NaN/inf there cannot leak."""
    contrib = per_token_loss * weights
    return torch.where(weights != 0, contrib, torch.zeros_like(contrib)).sum()


def split_scale(num_microbatches: int, dp_size: int) -> float:
    """Factor for each micro-batch's partial ``aggregate`` so megatron's reductions give the global loss.

    megatron-core's ``forward_step`` divides a loss returned as ``(loss, reduced_dict)`` by
    ``num_microbatches`` (and multiplies by the CP size, which DDP divides out again), and DDP averages
    gradients over the DP(xCP) group. The global loss is the plain *sum* of all partials, so each
    partial is returned multiplied by ``num_microbatches * dp_size``. (Do not return the 3-tuple
    ``(loss, num_tokens, dict)`` form: megatron would then also divide by ``num_tokens``.)
    Every DP rank must run the same ``num_microbatches``; uneven token counts are fine.
    """
    if num_microbatches < 1 or dp_size < 1:
        raise ValueError(f"num_microbatches and dp_size must be >= 1, got {num_microbatches}, {dp_size}")
    return float(num_microbatches * dp_size)
