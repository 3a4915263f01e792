"""Model-scored reward terms (``reward.models``): reward models and generative judges, batched.

Rule rewards are per-sample functions that run in a worker pool; model rewards hold a model or an engine,
so they run in the calling process over every sample routed to them at once. Routing is the same as for
rule terms: the term's ``data_sources``, else ``general`` (R1: rule rewards for math/code, model rewards
for general prompts). What the model sees depends on ``scope``: ``answer`` strips the chain of thought
(R1 judges helpfulness on the final summary only), ``response`` keeps everything (harmlessness).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Protocol, Sequence

from r1mega.config.errors import ConfigError
from r1mega.config.schema import ModelRewardConfig
from r1mega.rewards.extract import ANSWER_CLOSE, ANSWER_OPEN, split_think, with_prefill
from r1mega.rewards.sample import RewardInput, RewardResult

log = logging.getLogger(__name__)

MODEL_REWARD_KINDS = ("reward_model", "judge")
MODEL_REWARD_SCOPES = ("answer", "response")
MODEL_REWARD_DTYPES = ("float32", "bfloat16")
DEFAULT_MODEL_SOURCES = ("general",)


class ModelScorer(Protocol):
    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> list[tuple[float, Optional[str]]]:
        """(value, error or None) per (prompt, text)."""


@dataclass(frozen=True)
class ModelTerm:
    name: str
    weight: float
    data_sources: frozenset[str]
    cfg: ModelRewardConfig

    def applies_to(self, data_source: str) -> bool:
        return data_source in self.data_sources


def scoped_text(sample: RewardInput, scope: str) -> Optional[str]:
    """The part of the response a model judges; ``None`` when there is nothing (unclosed reasoning)."""
    response = with_prefill(sample.response, sample.prompt)
    if scope == "response":
        return response
    _, answer = split_think(response)
    if answer is None:
        return None
    answer = answer.replace(ANSWER_OPEN, "").replace(ANSWER_CLOSE, "").strip()
    return answer or None


def request_of(sample: RewardInput) -> str:
    """The user's request as a model reward shows it: ``question`` when known, else the rendered prompt."""
    return sample.question if sample.question is not None else sample.prompt


def build_scorer(cfg: ModelRewardConfig, engine: Any = None) -> ModelScorer:
    """A loaded scorer for ``cfg``: the reward model from ``cfg.path``; the judge over ``engine``."""
    if cfg.kind == "reward_model":
        from r1mega.rewards.reward_model import RewardModelScorer

        return RewardModelScorer(cfg)
    from r1mega.rewards.judge import JudgeScorer

    return JudgeScorer(cfg, engine)


class ModelRewards:
    """The model terms of a ``RewardComputer``: lazily loaded scorers, batched scoring, contained failures."""

    def __init__(self, terms: Sequence[ModelTerm], engines: Optional[Mapping[str, Any]] = None):
        """``engines``: the rollout engine of each judge, by name (rewards never start one; the trainer
        does, ``r1mega.rollout.judges``). A judge without one is refused here, not scored 0 later."""
        self.terms = tuple(terms)
        self.engines = dict(engines or {})
        missing = [t.name for t in self.terms if t.cfg.kind == "judge" and t.name not in self.engines]
        if missing:
            raise ConfigError([f"judge {name!r} has no rollout engine: pass RewardComputer(..., engines={{{name!r}: "
                               f"engine}}) (r1mega's trainer starts one from reward.models[].path)"
                               for name in missing])
        self._scorers: dict[str, ModelScorer] = {}

    def scorer(self, term: ModelTerm) -> ModelScorer:
        if term.name not in self._scorers:
            self._scorers[term.name] = build_scorer(term.cfg, self.engines.get(term.name))
        return self._scorers[term.name]

    def add_to(self, samples: Sequence[RewardInput], results: list[RewardResult]) -> None:
        """Score every routed sample with every model term; add weighted values to ``results``."""
        for term in self.terms:
            routed = [i for i, s in enumerate(samples) if term.applies_to(s.data_source)]
            texts = {i: scoped_text(samples[i], term.cfg.scope) for i in routed}
            to_score = [i for i in routed if texts[i] is not None]
            values: dict[int, tuple[float, Optional[str]]] = {i: (term.cfg.empty_score, None) for i in routed}
            if to_score:
                try:
                    scored = self.scorer(term).score([request_of(samples[i]) for i in to_score],
                                                     [texts[i] for i in to_score])
                    values.update(zip(to_score, scored))
                except Exception as exc:  # a broken model or engine must not kill the step
                    log.warning("model reward %r failed on a batch of %d (scored 0): %s", term.name,
                                len(to_score), exc)
                    values.update({i: (0.0, f"{type(exc).__name__}: {exc}") for i in to_score})
            for i, (value, error) in values.items():
                results[i].terms[term.name] = value
                results[i].total += term.weight * value
                if error:
                    results[i].errors[term.name] = error

    def close(self) -> None:
        """Drop the loaded scorers (the engines belong to the caller, who stops them)."""
        self._scorers.clear()


def check_model_rewards(models: Sequence[ModelRewardConfig], rule_names: Sequence[str]) -> list[str]:
    """Problems of ``reward.models`` (names, kinds, scopes, judge rubric and scale)."""
    problems: list[str] = []
    seen: set[str] = set()
    for i, m in enumerate(models):
        key = f"reward.models[{i}]"
        if m.name in seen:
            problems.append(f"{key}.name={m.name!r} is defined twice: give each model reward its own name")
        if m.name in rule_names:
            problems.append(f"{key}.name={m.name!r} is a built-in reward: choose another name")
        seen.add(m.name)
        for field_, value, allowed in (("kind", m.kind, MODEL_REWARD_KINDS), ("scope", m.scope, MODEL_REWARD_SCOPES),
                                       ("dtype", m.dtype, MODEL_REWARD_DTYPES)):
            if value not in allowed:
                problems.append(f"{key}.{field_}={value!r}: use one of {list(allowed)}")
        if m.batch_size < 1:
            problems.append(f"{key}.batch_size={m.batch_size} must be >= 1")
        if m.kind == "reward_model" and not m.path:
            problems.append(f"{key} (reward_model {m.name!r}) needs path: an HF *ForSequenceClassification directory")
        if m.kind == "judge":
            problems += _check_judge(key, m)
    return problems


def _check_judge(key: str, m: ModelRewardConfig) -> list[str]:
    from r1mega.data.templates import TEMPLATES

    problems = []
    if not m.score_max > m.score_min:
        problems.append(f"{key}.score_max={m.score_max} must exceed score_min={m.score_min}")
    if m.template not in TEMPLATES:
        problems.append(f"{key}.template={m.template!r}: use one of {sorted(TEMPLATES)}")
    if m.max_new_tokens < 1:
        problems.append(f"{key}.max_new_tokens={m.max_new_tokens} must be >= 1")
    try:
        filled = m.rubric.format(criterion="C", score_min=1, score_max=2, prompt="P", response="\x00R\x00")
        if "\x00R\x00" not in filled:
            problems.append(f"{key}.rubric has no {{response}} placeholder: the judge would not see the response")
    except (KeyError, IndexError, ValueError) as exc:
        problems.append(f"{key}.rubric does not format ({type(exc).__name__}: {exc}): placeholders are "
                        f"{{criterion}} {{score_min}} {{score_max}} {{prompt}} {{response}}; write literal "
                        f"braces as {{{{ and }}}}")
    return problems
