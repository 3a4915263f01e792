"""Evaluation as DeepSeek-R1 reports it, on any JSONL set (or a ``synthetic:<task>`` spec).

- ``pass@1`` = mean over problems of the mean correctness of ``k`` temperature samples (R1 §3:
  "pass@1 = 1/k sum p_i", which is less noisy than one greedy sample).
- ``cons@k`` = accuracy of the majority-voted final answer of the same ``k`` samples. Answers are
  grouped by equivalence (exact text after normalisation, else ``math_equal`` for math/arithmetic);
  samples without an extractable answer do not vote. **Ties** go to the answer class whose first
  member came first in sample order; a problem with no answer at all counts as wrong. The voted class
  is correct when its first member is. Multiple-choice samples vote with the extracted letter
  (``rewards.choice``). Code problems have no comparable final answer and are left out of cons@k
  (the key is absent when no problem qualifies).
- ``response_len`` = mean generated tokens; ``format`` = share of samples in the strict R1 template.

Correctness per data source is the same reward rejection sampling uses (``rewards.rejection.CORRECTNESS``):
1 when the term is 1 (all tests pass for code).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from r1mega.config.schema import R1Config, RewardConfig, RewardTermConfig
from r1mega.data.dataset import Example, load_examples
from r1mega.data.jsonl import DataError
from r1mega.data.tasks import is_synthetic, synthetic_examples
from r1mega.data.templates import get_template
from r1mega.rewards.accuracy import answer_key, math_equal
from r1mega.rewards.choice import choice_letters, extract_choice
from r1mega.rewards.extract import final_answer, with_prefill
from r1mega.rewards.rejection import CORRECTNESS
from r1mega.rewards.sample import reward_input_from_example

log = logging.getLogger(__name__)

MATH_SOURCES = ("math", "arithmetic")  # final answers compared with math_equal when voting


@dataclass
class EvalProblem:
    """One problem as the engine sees it (``ids``) and as the judge sees it (``example``, ``text``)."""

    example: Example
    text: str  # rendered prompt (a trailing <think> means the tag was prefilled)
    ids: list[int]


@dataclass
class ScoredSample:
    correct: float  # 1.0 or 0.0
    format: float  # strict template: 1.0 or 0.0
    answer: Optional[str]  # extracted final answer, None when there is none
    length: int  # generated tokens


# --------------------------------------------------------------------------- metrics (pure)


def pass_at_1(correct: Sequence[Sequence[float]]) -> float:
    """Mean over problems of the mean correctness of that problem's samples."""
    if not correct or any(len(c) == 0 for c in correct):
        raise ValueError("pass@1 needs at least one problem and one sample per problem")
    return sum(sum(c) / len(c) for c in correct) / len(correct)


def majority_vote(answers: Sequence[Optional[str]],
                  equivalent: Optional[Callable[[str, str], bool]] = None) -> Optional[int]:
    """Index of the sample that represents the winning answer class, or ``None`` when no sample answered.

    Classes are built in sample order: an answer joins the first class whose representative (first
    member) has the same normalised text or is ``equivalent`` to it. The largest class wins; a tie
    goes to the class formed first.
    """
    reps: list[int] = []
    counts: list[int] = []
    keys: list[str] = []
    for i, answer in enumerate(answers):
        if answer is None or not answer.strip():
            continue
        key = answer_key(answer)
        for c, rep in enumerate(reps):
            if keys[c] == key or (equivalent is not None and equivalent(answers[rep], answer)):
                counts[c] += 1
                break
        else:
            reps.append(i)
            counts.append(1)
            keys.append(key)
    if not reps:
        return None
    best = max(range(len(reps)), key=lambda c: (counts[c], -c))  # ties: earliest class
    return reps[best]


def cons_at_k(groups: Sequence[Sequence[ScoredSample]],
              equivalent: Optional[Callable[[str, str], bool]] = None) -> float:
    """Share of problems whose majority-voted answer is correct (no answer at all: wrong)."""
    if not groups:
        raise ValueError("cons@k needs at least one problem")
    hits = 0.0
    for group in groups:
        winner = majority_vote([s.answer for s in group], equivalent)
        hits += 0.0 if winner is None else group[winner].correct
    return hits / len(groups)


def summarize_eval(problems: Sequence[EvalProblem], groups: Sequence[Sequence[ScoredSample]],
                   math_timeout_s: int = 5, prefix: str = "eval/") -> dict[str, float]:
    """``{prefix}pass@1``, ``cons@k``, ``format``, ``response_len``, plus per-source pass@1 when mixed."""
    samples = [s for g in groups for s in g]
    out = {f"{prefix}pass@1": pass_at_1([[s.correct for s in g] for g in groups]),
           f"{prefix}format": sum(s.format for s in samples) / len(samples),
           f"{prefix}response_len": sum(s.length for s in samples) / len(samples)}
    equal = lambda a, b: math_equal(b, a, math_timeout_s)  # noqa: E731  (a: class representative)
    voting = [(p, g) for p, g in zip(problems, groups) if p.example.data_source != "code"]
    if voting:
        hits = [cons_at_k([g], equal if p.example.data_source in MATH_SOURCES else None) for p, g in voting]
        out[f"{prefix}cons@k"] = sum(hits) / len(hits)
    sources = sorted({p.example.data_source for p in problems})
    if len(sources) > 1:
        for src in sources:
            mine = [[s.correct for s in g] for p, g in zip(problems, groups) if p.example.data_source == src]
            out[f"{prefix}pass@1/{src}"] = pass_at_1(mine)
    return out


# --------------------------------------------------------------------------- problems and judging


def load_eval_examples(spec: str, seed: int = 0, max_prompts: int = 0) -> list[Example]:
    """Examples of a JSONL file (``prompt``/``messages`` + ``answer``/``tests``) or a ``synthetic:`` spec."""
    examples = synthetic_examples(spec, "eval", seed) if is_synthetic(spec) else load_examples(spec)
    examples = examples[:max_prompts] if max_prompts else examples
    for e in examples:
        if e.data_source not in CORRECTNESS:
            raise DataError(e.where or spec, None, f"data_source {e.data_source!r} has no verifiable correctness "
                                                   f"reward: eval supports {sorted(CORRECTNESS)}")
    return examples


def make_problems(examples: Sequence[Example], tokenizer, template: str = "r1",
                  max_prompt_tokens: Optional[int] = None) -> list[EvalProblem]:
    """Render each example's conversation with the chat template and tokenize it (BOS added)."""
    tpl = get_template(template)
    out = []
    for e in examples:
        text = tpl.prompt(e.chat())
        ids = tokenizer.encode(text, add_bos=True)
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            raise DataError(e.where or "<example>", None, f"prompt has {len(ids)} tokens, more than "
                                                          f"data.max_prompt_length={max_prompt_tokens}: raise it or "
                                                          f"drop the example")
        out.append(EvalProblem(e, text, ids))
    return out


def judge_config(base: RewardConfig, sources: Iterable[str] = tuple(CORRECTNESS)) -> RewardConfig:
    """The correctness term of each data source in ``sources`` plus the strict format check; the base
    config's answer format, timeouts, workers and sandbox are kept."""
    sources = set(sources)
    terms = [RewardTermConfig("accuracy", 1.0, sorted(sources & set(MATH_SOURCES)))] if sources & set(MATH_SOURCES) \
        else []
    terms += [RewardTermConfig(CORRECTNESS[s], 1.0, [s]) for s in sorted(sources - set(MATH_SOURCES))]
    return replace(base, terms=terms + [RewardTermConfig("format", 1.0)], format_mode="strict", overlong_buffer=0)


def extract_answer(example: Example, text: str) -> Optional[str]:
    """The answer a sample votes with: the chosen letter (multiple choice), the final answer (math and
    the like), ``None`` for code (a program has no comparable final answer)."""
    if example.data_source == "code":
        return None
    if example.data_source == "multiple_choice":
        return extract_choice(text, choice_letters(example.meta))
    return final_answer(text)


def score_groups(judge, problems: Sequence[EvalProblem], responses: Sequence[Sequence[tuple[str, int]]]
                 ) -> list[list[ScoredSample]]:
    """``responses[i]`` = ``(text, tokens)`` of problem ``i``'s samples -> scored samples (same shape)."""
    inputs = [reward_input_from_example(p.example, text, prompt=p.text, response_length=n)
              for p, group in zip(problems, responses) for text, n in group]
    results = iter(judge.compute(inputs))
    out = []
    for p, group in zip(problems, responses):
        term = CORRECTNESS[p.example.data_source]
        scored = []
        for text, n in group:
            r = next(results)
            answer = extract_answer(p.example, with_prefill(text, p.text))
            scored.append(ScoredSample(1.0 if r.terms.get(term, 0.0) >= 1.0 else 0.0,
                                       1.0 if r.terms.get("format", 0.0) >= 1.0 else 0.0, answer, n))
        out.append(scored)
    return out


def eval_sampling(cfg: R1Config, tokenizer, seed: Optional[int] = None):
    """Rollout sampling with the ``eval`` section's overrides (temperature, top-p, length, seed)."""
    from r1mega.rollout import SamplingSpec

    e = cfg.eval
    kw = {"seed": e.seed if seed is None else seed, "stop_token_ids": [tokenizer.eos_id]}
    for name in ("temperature", "top_p", "max_new_tokens"):
        if getattr(e, name) is not None:
            kw[name] = getattr(e, name)
    return SamplingSpec.from_config(cfg.rollout, **kw)


def generate_and_score(engine, judge, problems: Sequence[EvalProblem], k: int, sampling, tokenizer,
                       math_timeout_s: int = 5, prefix: str = "eval/"
                       ) -> tuple[dict, list[list[ScoredSample]], list[list[str]]]:
    """``k`` samples per problem from ``engine`` -> ``(metrics, scored samples, response texts)``."""
    return score_rows(judge, problems, engine.generate([p.ids for p in problems], k, sampling), tokenizer,
                      math_timeout_s, prefix)


def score_rows(judge, problems: Sequence[EvalProblem], rows, tokenizer, math_timeout_s: int = 5,
               prefix: str = "eval/") -> tuple[dict, list[list[ScoredSample]], list[list[str]]]:
    """The generations ``rows[i]`` of problem ``i`` scored -> ``(metrics, scored samples, response texts)``."""
    texts = [[tokenizer.decode([t for t in g.token_ids if t != tokenizer.eos_id]) for g in row] for row in rows]
    responses = [[(t, len(g.token_ids)) for t, g in zip(trow, row)] for trow, row in zip(texts, rows)]
    groups = score_groups(judge, problems, responses)
    return summarize_eval(problems, groups, math_timeout_s, prefix), groups, texts


def evaluate_collective(engine, judge, problems: Sequence[EvalProblem], k: int, sampling, tokenizer,
                        math_timeout_s: int = 5) -> dict:
    """Collective: rank 0 (which owns the engine) generates and scores; every rank gets the metrics. A
    collective engine (megatron, on every rank) generates on every rank; rank 0 scores."""
    import torch.distributed as dist

    from r1mega.platform.distributed import broadcast_from_rank0

    out = None
    if getattr(engine, "collective", False):
        rows = engine.generate([p.ids for p in problems], k, sampling)
        if not dist.is_initialized() or dist.get_rank() == 0:
            out = score_rows(judge, problems, rows, tokenizer, math_timeout_s)[0]
    elif engine is not None:
        out = generate_and_score(engine, judge, problems, k, sampling, tokenizer, math_timeout_s)[0]
    return broadcast_from_rank0(out)


def write_report(path: Path, metrics: dict, problems: Sequence[EvalProblem], groups, texts, meta: dict) -> Path:
    """``<path>`` (metrics + run facts) and ``<path stem>_samples.jsonl`` (every response, judged)."""
    path = Path(path)
    samples = write_samples(path.with_name(path.stem + "_samples.jsonl"), problems, groups, texts)
    path.write_text(json.dumps({**meta, **metrics, "samples_file": str(samples)}, indent=2))
    return path


def write_samples(samples: Path, problems: Sequence[EvalProblem], groups, texts) -> Path:
    """One JSONL line per problem: prompt, reference, and every response with its verdict."""
    samples.parent.mkdir(parents=True, exist_ok=True)
    with samples.open("w", encoding="utf-8") as f:
        for p, group, trow in zip(problems, groups, texts):
            f.write(json.dumps({"id": p.example.id, "where": p.example.where, "answer": p.example.answer,
                                "data_source": p.example.data_source, "prompt": p.text,
                                "samples": [{"response": t, "correct": s.correct, "format": s.format,
                                             "extracted": s.answer, "tokens": s.length}
                                            for s, t in zip(group, trow)]}, ensure_ascii=False) + "\n")
    return samples
