"""Verifiable rewards (DeepSeek-R1 style) and the registry that combines them.

Built-in terms (``reward.terms[*].name``): ``accuracy`` (math answer equivalence via math-verify),
``choice`` (multiple-choice letter), ``format`` (the ``<think>``/``<answer>`` template),
``language`` (chain-of-thought language consistency), ``code`` (sandboxed test execution),
``countdown`` and ``overlong`` (DAPO length shaping). Add one with ``@register_reward("name")`` on a
``(RewardInput, RewardConfig) -> float`` function at module level. Model rewards (``reward.models``:
an HF reward model, or a generative judge served by a rollout engine) are configured, not
registered: see ``model_rewards``.
"""

from r1mega.rewards import accuracy, choice, code_exec, countdown, formatting, language, length  # noqa: F401 (register)
from r1mega.rewards.accuracy import math_equal
from r1mega.rewards.choice import extract_choice
from r1mega.rewards.code_exec import extract_code, run_tests
from r1mega.rewards.compute import RewardComputer, check_reward_config, score_sample, summarize
from r1mega.rewards.countdown import check_countdown
from r1mega.rewards.extract import chain_of_thought, final_answer, last_boxed, split_think, with_prefill
from r1mega.rewards.formatting import format_checks, format_score
from r1mega.rewards.judge import JudgeScorer, Verdict, judge_prompt, parse_verdict
from r1mega.rewards.language import language_consistency
from r1mega.rewards.length import overlong_penalty
from r1mega.rewards.model_rewards import ModelRewards, scoped_text
from r1mega.rewards.registry import RewardSpec, get_reward, register_reward, registered_rewards
from r1mega.rewards.sample import RewardInput, RewardResult, reward_input_from_example
from r1mega.rewards.sandbox import RunResult, isolation, run_python

__all__ = [
    "JudgeScorer",
    "ModelRewards",
    "RewardComputer",
    "RewardInput",
    "RewardResult",
    "RewardSpec",
    "RunResult",
    "Verdict",
    "chain_of_thought",
    "check_countdown",
    "check_reward_config",
    "extract_choice",
    "extract_code",
    "final_answer",
    "format_checks",
    "format_score",
    "get_reward",
    "isolation",
    "judge_prompt",
    "language_consistency",
    "last_boxed",
    "math_equal",
    "overlong_penalty",
    "parse_verdict",
    "register_reward",
    "registered_rewards",
    "reward_input_from_example",
    "run_python",
    "run_tests",
    "scoped_text",
    "score_sample",
    "split_think",
    "summarize",
    "with_prefill",
]
