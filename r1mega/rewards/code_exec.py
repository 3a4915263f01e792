"""Code reward: run the candidate program against the sample's test cases; reward = fraction passed.

Test cases are ``{"input": stdin, "output": expected stdout}`` (compared line by line, trailing
whitespace ignored, here, outside the sandbox) or ``{"assert": python}`` (run after the program in its
namespace; passes when it runs to the end). Every case is a fresh sandboxed process with a private
filesystem view (``r1mega.rewards.sandbox``): neither the dataset nor an expected output is ever in
it. After the first timeout the remaining cases count as failed, so one slow program costs at most
one timeout, not one per case.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Optional

from r1mega.config.schema import CodeSandboxConfig, RewardConfig
from r1mega.rewards.extract import answer_part, last_tag_block, with_prefill
from r1mega.rewards.registry import register_reward
from r1mega.rewards.sample import RewardInput
from r1mega.rewards.sandbox import Isolation, run_python

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.S | re.I)


def extract_code(response: str) -> Optional[str]:
    """The program in a response: the last fenced block of the answer (``<answer>`` block, else the
    text after ``</think>``), else that text itself when it compiles as Python."""
    rest = answer_part(response)
    if rest is None:
        return None
    block = last_tag_block(rest)
    text = block if block is not None else rest
    fences = _FENCE.findall(text)
    if fences:
        return fences[-1]
    candidate = text.strip()
    if not candidate:
        return None
    try:
        compile(candidate, "<candidate>", "exec")
    except (SyntaxError, ValueError):
        return None
    return candidate


def _same_output(actual: str, expected: str) -> bool:
    def lines(s: str) -> list[str]:
        return [line.rstrip() for line in s.strip("\n").splitlines()]

    return lines(actual) == lines(expected)


def run_tests(program: str, tests: list[dict], cfg: Optional[CodeSandboxConfig] = None,
              iso: Optional[Isolation] = None) -> tuple[float, Counter]:
    """``(fraction of tests passed, count of run statuses)``; never raises for the program's behaviour."""
    cfg = cfg or CodeSandboxConfig()
    statuses: Counter = Counter()
    if not tests:
        raise ValueError("no test cases: a code sample needs a non-empty 'tests' list")
    try:
        compile(program, "<candidate>", "exec")
    except (SyntaxError, ValueError):
        statuses["syntax_error"] = len(tests)
        return 0.0, statuses
    passed = 0
    for i, case in enumerate(tests):
        if "assert" in case:
            result = run_python(program, "", cfg, iso, check=str(case["assert"]))
            ok = result.status == "ok"
        else:
            result = run_python(program, str(case.get("input", "")), cfg, iso)
            ok = result.status == "ok" and _same_output(result.stdout, str(case.get("output", "")))
        statuses[result.status] += 1
        passed += ok
        if result.status == "timeout":
            statuses["skipped_after_timeout"] += len(tests) - i - 1
            break
    return passed / len(tests), statuses


@register_reward("code", data_sources=("code",))
def code_reward(sample: RewardInput, cfg: RewardConfig) -> float:
    """Fraction of the sample's tests the extracted program passes (0 when there is no program)."""
    if not sample.tests:
        raise ValueError("code sample has no 'tests'")
    program = extract_code(with_prefill(sample.response, sample.prompt))
    if program is None:
        return 0.0
    return run_tests(program, sample.tests, cfg.sandbox)[0]
