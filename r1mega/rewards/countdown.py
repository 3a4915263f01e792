"""Countdown reward: an arithmetic expression that uses each given number once and hits the target.

The expression is the final answer (``<answer>`` block or ``\\boxed{}``; a trailing ``= target`` is
allowed). It is evaluated exactly (fractions) from its syntax tree, never with ``eval``: only
numbers, ``+ - * /`` and parentheses are accepted.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction
from typing import Optional

from r1mega.config.schema import RewardConfig
from r1mega.rewards.extract import final_answer, with_prefill
from r1mega.rewards.registry import register_reward
from r1mega.rewards.sample import RewardInput

_ALLOWED = re.compile(r"[\d+\-*/().\s×÷]+")
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left, used), _evaluate(node.right, used))
    raise ValueError(f"not allowed in a countdown expression: {ast.dump(node)[:60]}")


def check_countdown(expression: str, numbers: list[int], target: int) -> bool:
    """Whether ``expression`` uses exactly ``numbers`` (each once) and evaluates to ``target``."""
    expr = expression.replace("×", "*").replace("÷", "/").replace("\\times", "*").replace("\\div", "/")
    if "=" in expr:  # "3*8 = 24": keep the side that is not the target
        sides = [s.strip() for s in expr.split("=")]
        expr = next((s for s in sides if s and s != str(target)), "")
    if not expr or len(expr) > 200 or not _ALLOWED.fullmatch(expr):
        return False
    used: list[int] = []
    try:
        value = _evaluate(ast.parse(expr, mode="eval"), used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return False
    return Counter(used) == Counter(numbers) and value == target


def _target(sample: RewardInput) -> Optional[int]:
    try:
        return int(str(sample.reference).strip())
    except (TypeError, ValueError):
        return None


@register_reward("countdown", data_sources=("countdown",))
def countdown_reward(sample: RewardInput, cfg: RewardConfig) -> float:
    """1.0 for a correct countdown expression; the sample needs ``answer`` (target) and ``numbers``."""
    target, numbers = _target(sample), sample.meta.get("numbers")
    if target is None or not isinstance(numbers, list):
        raise ValueError("countdown sample needs an integer 'answer' (the target) and a 'numbers' list")
    answer = final_answer(with_prefill(sample.response, sample.prompt))
    return 1.0 if answer is not None and check_countdown(answer, numbers, target) else 0.0
