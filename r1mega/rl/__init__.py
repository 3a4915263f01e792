"""RL learner math: advantage estimators, policy losses, KL estimators, loss aggregation and
rollout/trainer mismatch corrections. Pure torch (no megatron), so every piece is unit-tested on CPU;
the learner step wires them into megatron's schedules.
"""

from r1mega.rl.advantages import (
    ADVANTAGES,
    REFILL_POLICIES,
    GroupSelection,
    GroupSelectionStats,
    compute_advantages,
    register_advantage,
    select_informative_groups,
    uniform_groups,
)
from r1mega.rl.aggregation import LOSS_AGG_MODES, aggregate, split_scale, token_weights
from r1mega.rl.kl import KL_ESTIMATORS, kl_penalty
from r1mega.rl.mismatch import mismatch_metrics, tis_weights
from r1mega.rl.policy_loss import (
    POLICY_LOSSES,
    clip_range,
    clipped_surrogate,
    entropy_bonus,
    masked_mean,
    policy_loss,
    register_policy_loss,
    sequence_mean,
)
from r1mega.rl.registry import Registry

__all__ = [
    "ADVANTAGES",
    "GroupSelection",
    "GroupSelectionStats",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "REFILL_POLICIES",
    "Registry",
    "aggregate",
    "clip_range",
    "clipped_surrogate",
    "compute_advantages",
    "entropy_bonus",
    "kl_penalty",
    "masked_mean",
    "mismatch_metrics",
    "policy_loss",
    "register_advantage",
    "register_policy_loss",
    "select_informative_groups",
    "sequence_mean",
    "split_scale",
    "tis_weights",
    "token_weights",
    "uniform_groups",
]
