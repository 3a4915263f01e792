"""Multiple-choice correctness (GPQA style): the letter the response chose equals the reference letter.

The letter extraction rule (one rule for the reward, the eval vote and the report):

1. A response whose ``<think>`` is never closed has no answer (as for math).
2. The final answer (``extract.final_answer``: the ``<answer>`` block, else the last ``\\boxed{}``,
   else a short bare line after the reasoning) names a letter when, after dropping ``$``, ``*``,
   ``\\text{}``-style wrappers, a trailing full stop and a lead-in ("Answer:", "the answer is",
   "the correct option is"), it is exactly a valid letter: ``C``, ``(C)``, ``C)``, ``C.``, ``C:``,
   optionally followed by the option's text (``C) 42 K``).
3. Otherwise the last explicit marker in the text after the reasoning counts: ``answer is (C)``,
   ``Answer: C``, ``correct option is C`` (simple-evals' ``Answer: $LETTER`` convention); the
   letter must be upper case and not part of a hedge such as ``A or B``.
4. Anything else (no letter, ``A or B``, a letter outside the problem's choices) has no answer
   and scores 0.

Valid letters are the problem's choice labels (``meta["choices"]`` keys), ``A``-``D`` by default.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Optional

from r1mega.config.schema import RewardConfig
from r1mega.rewards.extract import answer_part, final_answer, with_prefill
from r1mega.rewards.registry import register_reward
from r1mega.rewards.sample import RewardInput

DEFAULT_LETTERS = "ABCD"
_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|boxed)\s*\{([^{}]*)\}")
_LEAD_IN = re.compile(r"^(?:so,?\s+)?(?:the\s+)?(?:final\s+|correct\s+|best\s+)?(?:answer|choice|option)"
                      r"(?:\s+is)?\s*[:=]?\s*(?:option\s+|choice\s+)?", re.I)
_HEDGE = r"(?!\)?\s*(?:or|and|,|/)\s*\(?[A-Z]\b)"  # "A or B", "(A), (C)": no answer
_BARE = re.compile(r"(?:\(([A-Z])\)|([A-Z])(?=[.:)]|$))" + _HEDGE + r"(?:[.:)]?\s+.*|[.:)])?", re.S)
_MARKER = re.compile(r"(?:answer|choice|option)(?:\s+is)?\s*[:=]?\s*(?:option\s+|choice\s+)?\(?\s*([A-Za-z])\b"
                     + _HEDGE, re.I)


def _standalone(answer: str, letters: str) -> Optional[str]:
    """The letter when ``answer`` is a bare label such as ``C``, ``(C)``, ``C.`` or ``C) option text``."""
    text = _WRAPPER.sub(r"\1", answer).replace("$", "").replace("*", "").strip()
    text = _LEAD_IN.sub("", text).strip().rstrip(".").strip()
    m = _BARE.fullmatch(text)
    letter = m and (m.group(1) or m.group(2))
    return letter if letter and letter in letters else None


def extract_choice(response: str, letters: Iterable[str] = DEFAULT_LETTERS) -> Optional[str]:
    """The chosen letter (upper case) of a response by the module rule, or ``None`` when there is none."""
    letters = "".join(letters)
    rest = answer_part(response)
    if rest is None:
        return None
    final = final_answer(response)
    if final is not None:
        letter = _standalone(final, letters)
        if letter is not None:
            return letter
    for m in reversed(list(_MARKER.finditer(rest.replace("*", "")))):
        if m.group(1) in letters:  # case-sensitive here: "the answer is a guess" is prose
            return m.group(1)
    return None


def choice_letters(meta: dict) -> str:
    """The valid letters of a problem: its ``choices`` labels, else ``A``-``D``."""
    choices = meta.get("choices")
    return "".join(sorted(choices)) if isinstance(choices, dict) and choices else DEFAULT_LETTERS


@register_reward("choice", data_sources=("multiple_choice",))
def choice_reward(sample: RewardInput, cfg: RewardConfig) -> float:
    """1.0 when the extracted letter equals the reference letter."""
    reference = (sample.reference or "").strip().upper()
    if len(reference) != 1:
        raise ValueError(f"multiple-choice reference must be one letter, got {sample.reference!r}")
    letter = extract_choice(with_prefill(sample.response, sample.prompt), choice_letters(sample.meta))
    return 1.0 if letter == reference else 0.0
