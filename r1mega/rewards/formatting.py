"""Format reward: does the response follow the R1 template?

The template is reasoning inside ``<think>...</think>`` followed by the answer, either an
``<answer>...</answer>`` block (``answer_format="tag"``, the R1-Zero template) or a final
``\\boxed{}`` (``"boxed"``). The response is judged by six checks; ``strict`` scores 1 only when all
pass, ``partial`` scores the share that pass (a denser signal early in RL-from-scratch).
"""

from __future__ import annotations

import re

from r1mega.config.schema import RewardConfig
from r1mega.rewards.extract import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    last_boxed,
    with_prefill,
)
from r1mega.rewards.registry import register_reward
from r1mega.rewards.sample import RewardInput

FORMAT_MODES = ("strict", "partial")
ANSWER_FORMATS = ("tag", "boxed")
_AFTER_BOX = re.compile(r"[\s$.)\]\\]*")  # what may follow the final box: closing math, a full stop


def format_checks(text: str, answer_format: str = "tag") -> list[bool]:
    """The six template checks, in order: think opens the reply, one think pair, reasoning not empty,
    the answer follows the reasoning, the answer is not empty, nothing trails the answer."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format={answer_format!r}: use one of {ANSWER_FORMATS}")
    text = text.strip()
    one_think = text.count(THINK_OPEN) == 1 and text.count(THINK_CLOSE) == 1
    close, last_close = text.find(THINK_CLOSE), text.rfind(THINK_CLOSE)
    ordered = one_think and text.find(THINK_OPEN) < close
    cot = text[text.find(THINK_OPEN) + len(THINK_OPEN):close] if ordered else ""
    rest = text[last_close + len(THINK_CLOSE):] if last_close >= 0 else ""
    checks = [text.startswith(THINK_OPEN), ordered, bool(cot.strip())]
    if answer_format == "tag":
        single = rest.count(ANSWER_OPEN) == 1 and rest.count(ANSWER_CLOSE) == 1
        a_open, a_close = rest.find(ANSWER_OPEN), rest.find(ANSWER_CLOSE)
        follows = single and a_open < a_close and not rest[:a_open].strip()
        answer = rest[a_open + len(ANSWER_OPEN):a_close] if follows else ""
        trailing_ok = follows and not rest[a_close + len(ANSWER_CLOSE):].strip()
        return checks + [follows, bool(answer.strip()), trailing_ok]
    boxed = last_boxed(rest)
    tail = rest[rest.rfind(boxed) + len(boxed) + 1:] if boxed is not None else ""
    no_stray_tags = ANSWER_OPEN not in rest and THINK_OPEN not in rest
    return checks + [boxed is not None and no_stray_tags, bool(boxed and boxed.strip()),
                     boxed is not None and _AFTER_BOX.fullmatch(tail) is not None]


def format_score(text: str, answer_format: str = "tag", mode: str = "strict") -> float:
    if mode not in FORMAT_MODES:
        raise ValueError(f"format_mode={mode!r}: use one of {FORMAT_MODES}")
    checks = format_checks(text, answer_format)
    if mode == "strict":
        return 1.0 if all(checks) else 0.0
    return sum(checks) / len(checks)


@register_reward("format")
def format_reward(sample: RewardInput, cfg: RewardConfig) -> float:
    """R1 template adherence (``reward.format_mode``, ``reward.answer_format``)."""
    return format_score(with_prefill(sample.response, sample.prompt), cfg.answer_format, cfg.format_mode)
