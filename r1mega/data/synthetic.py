"""Synthetic verifiable tasks with exact answers, generated offline from a seed.

Addition (the foundation demo), multi-digit arithmetic with ``+ - *`` and countdown. ``tasks.py``
turns them into dataset records with train/eval splits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


def addition_problems(count: int, digits: int, seed: int) -> list[Problem]:
    """``a+b=`` with ``digits``-digit operands; the answer is the decimal sum."""
    rng = random.Random(seed)
    low, high = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    out = []
    for _ in range(count):
        a, b = rng.randint(low, high), rng.randint(low, high)
        out.append(Problem(f"{a}+{b}=", str(a + b)))
    return out


def split_train_eval(problems: list[Problem], eval_fraction: float) -> tuple[list[Problem], list[Problem]]:
    """Disjoint split by prompt, so no eval prompt is seen in training."""
    unique = list(dict.fromkeys(problems))
    n_eval = max(1, int(len(unique) * eval_fraction))
    return unique[n_eval:], unique[:n_eval]


# --------------------------------------------------------------------------- more tasks (R1 demo)

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_problems(count: int, digits: int, seed: int, ops: str = "+-*") -> list[Problem]:
    """``a<op>b=`` with ``digits``-digit operands and ``op`` drawn from ``ops`` (``+ - *``)."""
    unknown = set(ops) - set(_OPS)
    if unknown or not ops:
        raise ValueError(f"ops={ops!r}: use a non-empty combination of {''.join(_OPS)}")
    rng = random.Random(seed)
    low, high = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    out = []
    for _ in range(count):
        a, b, op = rng.randint(low, high), rng.randint(low, high), rng.choice(ops)
        out.append(Problem(f"{a}{op}{b}=", str(_OPS[op](a, b))))
    return out


@dataclass(frozen=True)
class CountdownProblem:
    """Reach ``target`` with ``+ - * /`` using each of ``numbers`` once; ``answer`` is one solution."""

    prompt: str
    answer: str
    numbers: tuple[int, ...]
    target: int


def _random_expression(rng: random.Random, numbers: list[int]) -> Optional[tuple[str, Fraction]]:
    """Combine ``numbers`` in a random order and tree shape; ``None`` when a division is not exact."""
    items = [(str(n), Fraction(n)) for n in numbers]
    rng.shuffle(items)
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        (ea, a), (eb, b) = items[i], items[j]
        op = rng.choice("+-*/")
        if op == "/":
            if b == 0 or (a / b).denominator != 1:
                return None
            value = a / b
        else:
            value = _OPS[op](a, b)
        items = [x for k, x in enumerate(items) if k not in (i, j)] + [(f"({ea}{op}{eb})", value)]
    expr, value = items[0]
    return (expr[1:-1] if expr.startswith("(") else expr), value


def countdown_problems(count: int, seed: int, num_numbers: int = 3, max_number: int = 20,
                       max_target: int = 100) -> list[CountdownProblem]:
    """Solvable countdown puzzles: targets in [1, max_target] built from a random expression."""
    rng = random.Random(seed)
    out: list[CountdownProblem] = []
    while len(out) < count:
        numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
        made = _random_expression(rng, numbers)
        if made is None or made[1].denominator != 1 or not 1 <= made[1] <= max_target:
            continue
        target = int(made[1])
        prompt = (f"Using the numbers {numbers}, create an equation that equals {target}. "
                  f"Use + - * / and each number exactly once.")
        out.append(CountdownProblem(prompt, made[0], tuple(numbers), target))
    return out
