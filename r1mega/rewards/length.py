"""Length shaping: DAPO's soft overlong punishment (Yu et al. 2025, eq. 13).

With maximum length ``L_max`` and buffer ``L_cache``, a response of ``L`` tokens gets 0 up to
``L_max - L_cache``, then a penalty falling linearly to -1 at ``L_max``, and -1 beyond. Added to the
correctness reward, it discourages hitting the length cap without punishing long-but-finished
reasoning as hard as truncation does.
"""

from __future__ import annotations

from r1mega.config.schema import RewardConfig
from r1mega.rewards.registry import register_reward
from r1mega.rewards.sample import RewardInput


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """Penalty in [-1, 0] for a response of ``length`` tokens."""
    if max_length <= 0 or not 0 <= buffer <= max_length:
        raise ValueError(f"need max_length > 0 and 0 <= buffer <= max_length, got {max_length}, {buffer}")
    free = max_length - buffer
    if length <= free:
        return 0.0
    if length > max_length:
        return -1.0
    return (free - length) / buffer


@register_reward("overlong")
def overlong_reward(sample: RewardInput, cfg: RewardConfig) -> float:
    """Soft overlong penalty (``reward.overlong_buffer``, ``reward.overlong_max_length``)."""
    if sample.response_length is None:
        raise ValueError("the overlong term needs the response length in tokens (RewardInput.response_length)")
    if cfg.overlong_max_length is None:
        raise ValueError("the overlong term needs reward.overlong_max_length (or rollout.max_new_tokens)")
    return overlong_penalty(sample.response_length, cfg.overlong_max_length, cfg.overlong_buffer)
