"""Accuracy reward for math: is the final answer equivalent to the reference (``math-verify``)?

Equivalence covers LaTeX vs plain forms, fractions vs decimals, percentages, sets, intervals,
equations (``x=3`` vs ``3``) and symbolic equality, via math-verify's parser and comparator. Anything
unparsable scores 0; this module never raises for a bad response.
"""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache

from r1mega.config.schema import RewardConfig
from r1mega.rewards.extract import final_answer, last_boxed, with_prefill
from r1mega.rewards.registry import register_reward
from r1mega.rewards.sample import RewardInput

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000  # longer "answers" are rambling, not an answer; and sympy on them is slow
_LEAD_IN = re.compile(r"^\s*(?:so,?\s+)?(?:the\s+)?(?:final\s+)?answer\s*(?:is\s*:?|:|=)?\s*", re.I)
_LATEX_CMD = re.compile(r"\\[A-Za-z]+(?:\{[^{}]*\})?")
_WORD = re.compile(r"(?<![A-Za-z])[A-Za-z]{3,}")


def _timeout(seconds: int):
    """math-verify times out with SIGALRM, which only works in the main thread."""
    return seconds if threading.current_thread() is threading.main_thread() else None


def _is_prose(answer: str) -> bool:
    """Whether the answer is a sentence ("7 apples") rather than a formula, after LaTeX commands go."""
    return bool(_WORD.search(_LATEX_CMD.sub(" ", answer)))


@lru_cache(maxsize=1)
def _mv():
    """Import math-verify on first use: it pulls sympy (~1 s), which most processes never need."""
    import math_verify

    return math_verify


def _parse(answer: str, timeout_s: int) -> list:
    mv = _mv()
    latex_first = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
    if _is_prose(answer):  # let math-verify find "answer is 7" / the last formula in the sentence
        return mv.parse(answer, parsing_timeout=_timeout(timeout_s))
    return mv.parse("\\boxed{" + answer + "}", latex_first, parsing_timeout=_timeout(timeout_s))


def _normalise(answer: str) -> str:
    answer = _LEAD_IN.sub("", answer.strip()).strip().rstrip(".").strip()
    return answer.strip("$").strip()


_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")


def _plain(answer: str) -> str:
    """Answer text without formatting, for an exact (case-insensitive) match before any parsing."""
    return re.sub(r"\s+", "", _TEXT_WRAPPER.sub(r"\1", answer)).strip("$.").lower()


def answer_key(answer: str) -> str:
    """Normalised answer text ("The answer is $\\text{Monday}$." -> "monday"): equal keys, equal answers."""
    return _plain(_normalise(answer))


_INTEGER = re.compile(r"[+-]?[0-9]{1,18}")


def _integer(answer: str):
    """The value of a normalised answer written as a plain integer ("42", "-7", "007"), else None."""
    return int(answer) if _INTEGER.fullmatch(answer) else None


@lru_cache(maxsize=4096)
def _parse_reference(reference: str, timeout_s: int) -> tuple[str, tuple, object]:
    """``(plain text, parsed, integer value or None)`` of a reference; a full solution is reduced to its boxed
    answer."""
    boxed = last_boxed(reference)
    answer = _normalise(boxed if boxed is not None else reference)
    parsed = tuple(_parse(answer, timeout_s))
    if not parsed:
        log.warning("reference answer %r is not parsable by math-verify: only an exact text match scores",
                    reference)
    return _plain(answer), parsed, _integer(answer)


def math_equal(answer: str, reference: str, timeout_s: int = 5) -> bool:
    """Whether ``answer`` (a final-answer string) is mathematically equivalent to ``reference``.

    An exact match after removing formatting (``\\text{}``, spaces, case) is accepted first, so
    textual answers ("Monday", "(B)") work too; otherwise math-verify parses and compares.
    """
    answer = _normalise(answer)
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return False
    try:
        gold_text, gold, gold_int = _parse_reference(reference, timeout_s)
        if gold_text and _plain(answer) == gold_text:
            return True
        if not gold:
            return False
        pred_int = _integer(answer)
        if gold_int is not None and pred_int is not None:
            # two plain integers: math-verify's verdict (exact equality) without its parse, about 1 ms a sample
            # (most of a GRPO step's scoring on integer-answer data)
            return pred_int == gold_int
        pred = _parse(answer, timeout_s)
        return bool(pred) and bool(_mv().verify(list(gold), pred, timeout_seconds=_timeout(timeout_s)))
    except Exception as exc:  # a bad response must never kill a batch
        log.debug("math-verify failed on %r vs %r: %r", answer, reference, exc)
        return False


@register_reward("accuracy", data_sources=("math", "arithmetic"))
def accuracy_reward(sample: RewardInput, cfg: RewardConfig) -> float:
    """1.0 when the final answer (``<answer>`` block or last ``\\boxed{}``) equals the reference."""
    if sample.reference is None or not str(sample.reference).strip():
        raise ValueError("sample has no reference answer: give the dataset an 'answer' field")
    answer = final_answer(with_prefill(sample.response, sample.prompt))
    if answer is None:
        return 0.0
    return 1.0 if math_equal(answer, str(sample.reference), cfg.math_timeout_s) else 0.0
