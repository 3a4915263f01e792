"""Format, language-consistency, countdown and overlong reward terms."""

from __future__ import annotations

import pytest

from r1mega.config.schema import RewardConfig
from r1mega.rewards import (
    RewardInput,
    check_countdown,
    format_checks,
    format_score,
    get_reward,
    language_consistency,
    overlong_penalty,
)

GOOD_TAG = "<think>\nadd 2 and 2\n</think>\n<answer>4</answer>"
GOOD_BOX = "<think>add 2 and 2</think>\nThe sum is $\\boxed{4}$."


@pytest.mark.parametrize("text,answer_format,strict,partial", [
    (GOOD_TAG, "tag", 1.0, 1.0),
    ("  " + GOOD_TAG + "\n", "tag", 1.0, 1.0),
    (GOOD_BOX, "boxed", 1.0, 1.0),
    (GOOD_BOX, "tag", 0.0, 0.5),  # no answer block: the three answer checks fail
    (GOOD_TAG, "boxed", 0.0, 0.5),
    ("<think>add</think><answer>4</answer> trailing words", "tag", 0.0, 5 / 6),
    ("<think></think><answer>4</answer>", "tag", 0.0, 5 / 6),  # empty reasoning
    ("<think>add</think><answer> </answer>", "tag", 0.0, 5 / 6),  # empty answer
    ("Sure! <think>add</think><answer>4</answer>", "tag", 0.0, 5 / 6),  # does not open with <think>
    ("<think>a</think><think>b</think><answer>4</answer>", "tag", 0.0, 4 / 6),  # two think blocks, answer ok
    ("<think>add</think><answer>4</answer><answer>5</answer>", "tag", 0.0, 3 / 6),
    ("<think>add 2 and 2, the answer is 4", "tag", 0.0, 1 / 6),  # truncated
    ("4", "tag", 0.0, 0.0),
    ("", "boxed", 0.0, 0.0),
])
def test_format_strict_and_partial(text, answer_format, strict, partial):
    assert format_score(text, answer_format, "strict") == strict
    assert format_score(text, answer_format, "partial") == pytest.approx(partial)
    assert len(format_checks(text, answer_format)) == 6


def test_format_reward_reads_config_and_prefill():
    fn = get_reward("format").fn
    prefilled = RewardInput("add</think><answer>4</answer>", prompt="<｜User｜>2+2<｜Assistant｜><think>\n")
    assert fn(prefilled, RewardConfig()) == 1.0
    assert fn(RewardInput("add</think><answer>4</answer>"), RewardConfig()) == 0.0
    assert fn(RewardInput(GOOD_BOX), RewardConfig(answer_format="boxed")) == 1.0
    assert fn(RewardInput("<think>x</think>"), RewardConfig(format_mode="partial")) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="format_mode"):
        format_score(GOOD_TAG, "tag", "lenient")


@pytest.mark.parametrize("text,language,expected", [
    ("First add the digits then carry the one", "en", 1.0),
    ("First add the digits 然后 carry", "en", 5 / 7),  # two Chinese characters = two words
    ("我们 先 计算 then check", "zh", 5 / 7),
    ("我们先计算", "zh", 1.0),
    ("Nous calculons la réponse", "en", 3 / 4),  # the accented word is not English
    ("Nous calculons la réponse", "fr", 1.0),
    ("Считаем сумму then done", "ru", 0.5),
    ("We compute $\\alpha + \\beta = \\frac{1}{2}$ and \\sqrt{2} then 42", "en", 1.0),  # math is neutral
    ("```python\nprint('代码')\n```\nall English here", "en", 1.0),  # code is neutral
    ("123 + 456 = 579", "en", 0.0),  # no words at all
    ("", "en", 0.0),
])
def test_language_consistency(text, language, expected):
    assert language_consistency(text, language) == pytest.approx(expected)


def test_language_reward_scores_only_the_chain_of_thought():
    fn = get_reward("language").fn
    response = "<think>We add the numbers carefully</think><answer>答案是 4</answer>"
    assert fn(RewardInput(response), RewardConfig(target_language="en")) == 1.0
    assert fn(RewardInput(response), RewardConfig(target_language="zh")) == 0.0
    with pytest.raises(ValueError, match="target_language"):
        language_consistency("hello", "klingon")


@pytest.mark.parametrize("expr,numbers,target,ok", [
    ("(9+17)-2", [17, 9, 2], 24, True),
    ("3*8 = 24", [3, 8], 24, True),
    ("24 = 3 × 8", [3, 8], 24, True),
    ("(6 / 3) * 12", [3, 6, 12], 24, True),
    ("6/4*16", [4, 6, 16], 24, True),  # exact fractions: 6/4 = 3/2
    ("9+17", [17, 9, 2], 26, False),  # 2 unused
    ("9+17-2-2", [17, 9, 2], 22, False),  # 2 used twice
    ("9+15", [9, 15], 25, False),  # wrong value
    ("2**3*3", [2, 3, 3], 24, False),  # power is not allowed
    ("__import__('os')", [1], 1, False),
    ("8/(3-3)", [8, 3, 3], 1, False),  # division by zero
    ("", [1], 1, False),
])
def test_countdown_check(expr, numbers, target, ok):
    assert check_countdown(expr, numbers, target) is ok


def test_countdown_reward_needs_numbers():
    fn = get_reward("countdown").fn
    sample = RewardInput("<think>t</think><answer>3*8</answer>", "24", "countdown", meta={"numbers": [8, 3]})
    assert fn(sample, RewardConfig()) == 1.0
    with pytest.raises(ValueError, match="numbers"):
        fn(RewardInput("<answer>3*8</answer>", "24", "countdown"), RewardConfig())


@pytest.mark.parametrize("length,expected", [(0, 0.0), (80, 0.0), (90, -0.5), (99, -0.95), (100, -1.0),
                                              (101, -1.0), (5000, -1.0)])
def test_overlong_penalty_dapo(length, expected):
    assert overlong_penalty(length, max_length=100, buffer=20) == pytest.approx(expected)


def test_overlong_reward_hard_cut_and_requirements():
    fn = get_reward("overlong").fn
    cfg = RewardConfig(overlong_max_length=100, overlong_buffer=0)
    assert fn(RewardInput("x", response_length=100), cfg) == 0.0
    assert fn(RewardInput("x", response_length=101), cfg) == -1.0
    with pytest.raises(ValueError, match="response_length"):
        fn(RewardInput("x"), cfg)
    with pytest.raises(ValueError, match="overlong_max_length"):
        fn(RewardInput("x", response_length=5), RewardConfig())
