"""Synthetic verifiable tasks with exact answers, generated offline from a seed."""

from __future__ import annotations

import random
from dataclasses import dataclass


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
