"""Per-token KL(pi || pi_ref) estimators from sampled-token logprobs (Schulman, "Approximating KL
divergence", 2020). Samples come from pi (the policy that produced ``logp``).

- ``k1`` = log r with log r = logp - ref: unbiased, high variance, can be negative. Use it for a
  KL penalty *in the reward* (its expectation is the KL).
- ``k2`` = 0.5 (logp - ref)^2: biased, low variance, >= 0.
- ``k3`` = exp(ref - logp) - (ref - logp) - 1: unbiased, low variance, >= 0 (verl's ``low_var_kl``;
  GRPO's KL loss term, Shao et al. 2024).
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")
# exp() of the k3 input is clamped here, as verl's low_var_kl: exp(20) ~ 5e8 keeps fp32/bf16 finite
# when a token's logprob under the policy and the reference disagree wildly (e.g. -inf-ish padding).
K3_LOG_RATIO_CLAMP = 20.0


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL estimate, same shape as ``logp``; differentiable w.r.t. ``logp`` (and ``ref_logp``).

    k3's log-ratio is clamped to [-20, 20] (verl); the result is *not* clamped (verl also caps it at
    10, which silently zeroes the gradient where the policy drifted furthest).
    """
    diff = logp - ref_logp
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff * diff
    if estimator == "k3":
        log_ratio = torch.clamp(-diff, -K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
        # expm1 keeps tiny ratios accurate; the clamp removes rounding noise below 0 (k3 >= 0 exactly).
        return (torch.expm1(log_ratio) - log_ratio).clamp(min=0.0)
    raise ValueError(f"unknown KL estimator {estimator!r}: choose one of {KL_ESTIMATORS}")
