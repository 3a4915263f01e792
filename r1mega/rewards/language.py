"""Language-consistency reward (DeepSeek-R1 §2.3.3): share of the chain of thought in the target language.

Word and script based, no model: each word of the reasoning is classified by its Unicode script
(Chinese counts one word per character, since it has no spaces); the reward is the fraction of words
whose script belongs to the target language. Math (``$...$``, ``\\(...\\)``, ``\\[...\\]``), LaTeX
commands, code blocks and numbers are neutral. English additionally requires plain ASCII letters,
which is how an English chain of thought that drifts into, say, French accents is told apart;
Latin-script languages are not distinguished from each other beyond that.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from itertools import groupby

from r1mega.config.schema import RewardConfig
from r1mega.rewards.extract import chain_of_thought, with_prefill
from r1mega.rewards.registry import register_reward
from r1mega.rewards.sample import RewardInput

# Scripts a language is written in; "LATIN_ASCII" is Latin without diacritics.
LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    "en": frozenset({"LATIN_ASCII"}),
    "fr": frozenset({"LATIN", "LATIN_ASCII"}),
    "de": frozenset({"LATIN", "LATIN_ASCII"}),
    "es": frozenset({"LATIN", "LATIN_ASCII"}),
    "it": frozenset({"LATIN", "LATIN_ASCII"}),
    "pt": frozenset({"LATIN", "LATIN_ASCII"}),
    "vi": frozenset({"LATIN", "LATIN_ASCII"}),
    "zh": frozenset({"CJK"}),
    "ja": frozenset({"CJK", "HIRAGANA", "KATAKANA"}),
    "ko": frozenset({"HANGUL"}),
    "ru": frozenset({"CYRILLIC"}),
    "uk": frozenset({"CYRILLIC"}),
    "el": frozenset({"GREEK"}),
    "ar": frozenset({"ARABIC"}),
    "he": frozenset({"HEBREW"}),
    "hi": frozenset({"DEVANAGARI"}),
    "th": frozenset({"THAI"}),
}
_PER_CHARACTER = frozenset({"CJK", "HIRAGANA", "KATAKANA"})  # no spaces between words
_NEUTRAL = re.compile(
    r"```.*?```|\$\$.*?\$\$|\$[^$]*\$|\\\(.*?\\\)|\\\[.*?\\\]|\\[A-Za-z]+|<[/a-z]+>",
    re.S,
)
_LETTERS = re.compile(r"[^\W\d_]+")


@lru_cache(maxsize=65536)
def script_of(ch: str) -> str:
    """The script of one letter: LATIN_ASCII, LATIN, CJK, HIRAGANA, CYRILLIC, ... or OTHER."""
    if ch.isascii():
        return "LATIN_ASCII"
    name = unicodedata.name(ch, "")
    first = name.split(" ", 1)[0]
    if first in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "LATIN", "CYRILLIC", "GREEK", "ARABIC",
                 "HEBREW", "DEVANAGARI", "THAI"):
        return first
    if first == "IDEOGRAPHIC":
        return "CJK"
    return "OTHER"


def _family(script: str) -> str:
    return "LATIN" if script == "LATIN_ASCII" else script


def word_scripts(text: str) -> list[str]:
    """One script label per word of ``text`` (math, code and LaTeX removed first)."""
    out: list[str] = []
    for match in _LETTERS.finditer(_NEUTRAL.sub(" ", text)):
        for family, group in groupby(match.group(), key=lambda ch: _family(script_of(ch))):
            chars = list(group)
            if family in _PER_CHARACTER:
                out.extend([family] * len(chars))
            elif family == "LATIN":
                out.append("LATIN_ASCII" if all(c.isascii() for c in chars) else "LATIN")
            else:
                out.append(family)
    return out


def language_consistency(text: str, language: str = "en") -> float:
    """Fraction of the words of ``text`` written in ``language``'s script (0.0 when there are none)."""
    try:
        allowed = LANGUAGE_SCRIPTS[language]
    except KeyError:
        raise ValueError(f"target_language={language!r} is not supported: use one of "
                         f"{sorted(LANGUAGE_SCRIPTS)}") from None
    scripts = word_scripts(text)
    if not scripts:
        return 0.0
    return sum(s in allowed for s in scripts) / len(scripts)


@register_reward("language")
def language_reward(sample: RewardInput, cfg: RewardConfig) -> float:
    """Share of the chain of thought in ``reward.target_language`` (no reasoning words scores 0)."""
    text = chain_of_thought(with_prefill(sample.response, sample.prompt))
    return language_consistency(text, cfg.target_language)
