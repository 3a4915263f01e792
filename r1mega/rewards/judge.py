"""Generative judge: a rubric prompt to an LLM served by a rollout engine, its verdict parsed to a score.

The engine is anything with the rollout protocol's ``generate`` (``r1mega.rollout.protocol``): a vLLM
engine in production, a small fake in unit tests. Verdicts end with ``Score: <number>`` (also accepted:
``Score: 7/10``, ``**Score:** 7``, ``Rating: [[7]]``); the last one counts, and reasoning judges' text
inside ``<think>`` is ignored. A verdict that is empty, has no score, is cut off while thinking or is
outside ``[score_min, score_max]`` does not guess: it scores ``unparsed_score`` and the reason goes into
the sample's ``errors`` so it shows up in the metrics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from r1mega.config.schema import ModelRewardConfig
from r1mega.data.templates import render_prompt
from r1mega.rewards.extract import split_think

_NUMBER = r"([-+]?\d+(?:\.\d+)?)"
_SCORE = re.compile(r"(?:score|rating)\**\s*[:=]?\s*\**\s*(?:\[\[\s*)?" + _NUMBER
                    + r"(?:\s*\]\])?(?:\s*/\s*" + _NUMBER + r")?", re.IGNORECASE)
_BRACKETED = re.compile(r"\[\[\s*" + _NUMBER + r"\s*\]\]")
_SHOWN = 80  # characters of a bad verdict quoted in its error


@dataclass(frozen=True)
class Verdict:
    """A parsed verdict: ``score`` normalised to [0, 1], or ``None`` with the reason in ``error``."""

    score: Optional[float]
    raw: Optional[float] = None  # the number the judge wrote
    error: Optional[str] = None


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def parse_verdict(text: Optional[str], score_min: float, score_max: float) -> Verdict:
    """The judge's score on [score_min, score_max] mapped to [0, 1]; never raises."""
    if text is None or not text.strip():
        return Verdict(None, error="empty verdict")
    thought, after = split_think(text)
    if after is None:
        return Verdict(None, error=f"verdict cut off inside <think>: {_quote(text)}")
    matches = list(_SCORE.finditer(after)) or list(_BRACKETED.finditer(after))
    if not matches:
        return Verdict(None, error=f"no 'Score: <number>' in verdict: {_quote(after)}")
    last = matches[-1]
    value = float(last.group(1))
    denominator = last.group(2) if last.re is _SCORE else None
    if denominator is not None and float(denominator) != score_max:
        return Verdict(None, value, f"verdict scored out of {denominator}, the rubric asks for {score_min:g}-"
                                    f"{score_max:g}: {_quote(last.group(0))}")
    if not score_min <= value <= score_max:
        return Verdict(None, value, f"verdict score {value:g} outside [{score_min:g}, {score_max:g}]")
    return Verdict((value - score_min) / (score_max - score_min), value)


def judge_prompt(cfg: ModelRewardConfig, prompt: str, response: str) -> str:
    """The rubric with the sample filled in, wrapped in the judge's chat template."""
    body = cfg.rubric.format(criterion=cfg.criterion or cfg.name, score_min=f"{cfg.score_min:g}",
                             score_max=f"{cfg.score_max:g}", prompt=prompt, response=response)
    return render_prompt([{"role": "user", "content": body}], cfg.template)


class JudgeScorer:
    """Scores (prompt, text) pairs with one greedy verdict each from ``engine``, ``batch_size`` per call."""

    def __init__(self, cfg: ModelRewardConfig, engine: Any):
        self.cfg = cfg
        self.engine = engine

    def verdicts(self, prompts: Sequence[str], texts: Sequence[str]) -> list[str]:
        from r1mega.rollout.protocol import SamplingSpec

        sampling = SamplingSpec(max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                seed=0, logprobs_mode=getattr(self.engine, "logprobs_mode", "processed"),
                                return_text=True)
        requests = [judge_prompt(self.cfg, p, t) for p, t in zip(prompts, texts)]
        out: list[str] = []
        step = max(1, self.cfg.batch_size)
        for i in range(0, len(requests), step):
            generations = self.engine.generate(requests[i:i + step], 1, sampling)
            out += [row[0].text if row else "" for row in generations]
        return out

    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> list[tuple[float, Optional[str]]]:
        results = []
        for verdict_text in self.verdicts(prompts, texts):
            verdict = parse_verdict(verdict_text, self.cfg.score_min, self.cfg.score_max)
            if verdict.score is None:
                results.append((self.cfg.unparsed_score, verdict.error))
            else:
                results.append((verdict.score, None))
        return results
