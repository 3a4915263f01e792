"""Pull the parts of an R1-style response apart: chain of thought, answer block, final boxed answer.

Shared by the accuracy, format, language, countdown and code rewards so they agree on what "the
answer" is: the last ``<answer>...</answer>`` block (its last ``\\boxed{}`` if it has one), else the
last ``\\boxed{}`` after ``</think>``, else a short bare answer line. A response whose ``<think>`` is
never closed (cut off while reasoning) has no answer.
"""

from __future__ import annotations

import re
from typing import Optional

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
MAX_BARE_ANSWER_CHARS = 64  # a reply with no tags and no box counts as an answer only when this short

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def with_prefill(response: str, prompt: str = "") -> str:
    """The response as the model meant it: re-attach a ``<think>`` that the prompt prefilled."""
    if prompt.rstrip().endswith(THINK_OPEN) and not response.lstrip().startswith(THINK_OPEN):
        return THINK_OPEN + response
    return response


def split_think(text: str) -> tuple[Optional[str], Optional[str]]:
    """``(chain of thought, text after </think>)``.

    No think tags at all: ``(None, text)``. An opened but unclosed ``<think>``: ``(rest, None)``
    (truncated reasoning, no answer part).
    """
    close = text.find(THINK_CLOSE)
    if close < 0:
        opened = text.find(THINK_OPEN)
        if opened < 0:
            return None, text
        return text[opened + len(THINK_OPEN):], None
    opened = text.rfind(THINK_OPEN, 0, close)
    start = opened + len(THINK_OPEN) if opened >= 0 else 0
    return text[start:close], text[close + len(THINK_CLOSE):]


def last_tag_block(text: str, open_tag: str = ANSWER_OPEN, close_tag: str = ANSWER_CLOSE) -> Optional[str]:
    """Content of the last complete ``open_tag ... close_tag`` block, or ``None``."""
    end = text.rfind(close_tag)
    if end < 0:
        return None
    start = text.rfind(open_tag, 0, end)
    if start < 0:
        return None
    return text[start + len(open_tag):end]


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{}``) with balanced braces, or ``None``."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            c = text[i]
            if c == "\\" and i + 1 < len(text):  # skip escaped characters such as \{ and \}
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(c, 0)
            i += 1
        if depth == 0:
            return text[start:i - 1]
    return None


def answer_part(text: str) -> Optional[str]:
    """The text after the reasoning (``None`` when the reasoning was never closed)."""
    return split_think(text)[1]


def final_answer(text: str) -> Optional[str]:
    """The final answer string of a response (see module docstring), or ``None`` when there is none."""
    rest = answer_part(text)
    if rest is None:
        return None
    block = last_tag_block(rest)
    if block is not None:
        boxed = last_boxed(block)
        return (boxed if boxed is not None else block).strip() or None
    boxed = last_boxed(rest)
    if boxed is not None:
        return boxed.strip() or None
    bare = rest.strip()
    if bare and "\n" not in bare and len(bare) <= MAX_BARE_ANSWER_CHARS and "<" not in bare:
        return bare
    return None


def chain_of_thought(text: str) -> str:
    """The reasoning: inside ``<think>``, else everything except the answer block."""
    cot, rest = split_think(text)
    if cot is not None:
        return cot
    block_start = rest.rfind(ANSWER_OPEN) if rest is not None else -1
    return rest[:block_start] if block_start >= 0 else (rest or "")
