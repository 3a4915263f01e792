"""Rejection sampling (DeepSeek-R1 stage 3): keep the good generations of each prompt as SFT data.

For each prompt with k generations, a generation is kept when it is correct (the data source's
correctness reward is 1: ``accuracy`` for math, ``countdown``, all tests pass for ``code``, the right letter for
``multiple_choice``),
strictly well formatted, its chain of thought is at least ``min_language`` in the target language,
and (with ``max_response_tokens``) it is not longer than the cap; duplicates (same text up to
whitespace) are dropped and at most ``max_per_prompt`` are kept. Kept generations are written as chat
records (``messages`` ending with the assistant reply in the R1 template) that
``r1mega.data.iter_examples`` reads back. A generation may be a dict (``text`` plus fields such as the
token ids and the teacher's top-k log-probs for distillation): its other fields are kept in the record.
The report counts every drop by reason.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

from r1mega.config.schema import RewardConfig, RewardTermConfig
from r1mega.data.dataset import Example, example_from_record
from r1mega.data.jsonl import DataError, PathLike, read_jsonl
from r1mega.rewards.compute import RewardComputer
from r1mega.rewards.sample import RewardResult, reward_input_from_example

CORRECTNESS = {"math": "accuracy", "arithmetic": "accuracy", "countdown": "countdown", "code": "code",
               "multiple_choice": "choice"}
REASONS = ("unverifiable", "incorrect", "bad_format", "mixed_language", "too_long", "duplicate", "over_cap")
Generation = Union[str, dict]  # the response text, or {"text": ..., "token_ids": [...], other fields to keep}


@dataclass
class RejectionReport:
    prompts: int = 0
    generations: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> generations
    prompts_without_kept: int = 0

    def as_dict(self) -> dict:
        return {"prompts": self.prompts, "generations": self.generations, "kept": self.kept,
                "dropped": {r: self.dropped.get(r, 0) for r in REASONS},
                "prompts_without_kept": self.prompts_without_kept}


def judge_config(base: Optional[RewardConfig] = None) -> RewardConfig:
    """The reward terms rejection sampling needs, with the base config's format/language/sandbox settings."""
    base = base or RewardConfig(num_workers=0)
    terms = [RewardTermConfig("accuracy", 1.0, ["math", "arithmetic"]),
             RewardTermConfig("countdown", 1.0), RewardTermConfig("code", 1.0), RewardTermConfig("choice", 1.0),
             RewardTermConfig("format", 1.0), RewardTermConfig("language", 1.0)]
    return replace(base, terms=terms, format_mode="strict")


def _drop_reason(example: Example, result: RewardResult, min_language: float) -> Optional[str]:
    name = CORRECTNESS.get(example.data_source)
    if name is None or name in result.errors:
        return "unverifiable"
    if result.terms.get(name, 0.0) < 1.0:
        return "incorrect"
    if result.terms.get("format", 0.0) < 1.0:
        return "bad_format"
    if result.terms.get("language", 0.0) < min_language:
        return "mixed_language"
    return None


def _select(example: Example, responses: Sequence[str], results: Sequence[RewardResult], max_per_prompt: int,
            min_language: float, report: RejectionReport, too_long: Sequence[bool]) -> list[int]:
    kept: list[int] = []
    seen: set[str] = set()
    for i, (response, result) in enumerate(zip(responses, results)):
        reason = _drop_reason(example, result, min_language)
        if reason is None and too_long[i]:
            reason = "too_long"
        key = " ".join(response.split())
        if reason is None and key in seen:
            reason = "duplicate"
        if reason is None and len(kept) >= max_per_prompt:
            reason = "over_cap"
        if reason is None:
            seen.add(key)
            kept.append(i)
        else:
            report.dropped[reason] += 1
    return kept


def _sft_record(example: Example, response: str, extra: dict) -> dict:
    chat = example.chat() + [{"role": "assistant", "content": response}]
    return {**replace(example, prompt=None, messages=chat).to_record(), **extra}


def _too_long(generation: Generation, max_tokens: int) -> bool:
    if not max_tokens:
        return False
    if not isinstance(generation, dict) or "token_ids" not in generation:
        raise ValueError("max_response_tokens needs each generation as a dict with its 'token_ids'")
    return len(generation["token_ids"]) > max_tokens


def rejection_sample(groups: Iterable[tuple[Example, Sequence[Generation]]], out_path: PathLike, *,
                     reward_cfg: Optional[RewardConfig] = None, max_per_prompt: int = 4,
                     min_language: float = 0.95, response_prefix: str = "", max_response_tokens: int = 0,
                     prompts_per_batch: int = 64) -> RejectionReport:
    """Filter ``(example, generations)`` groups into an SFT JSONL at ``out_path``; returns the counts.

    ``response_prefix`` is what the generation prompt prefilled (e.g. ``"<think>\\n"`` for the ``r1``
    template); it is put back in front of each generation before judging and writing.
    ``max_response_tokens`` > 0 drops generations with more tokens (dict generations with ``token_ids``).
    """
    if max_per_prompt < 1:
        raise ValueError(f"max_per_prompt={max_per_prompt} must be >= 1")
    report = RejectionReport()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with RewardComputer(judge_config(reward_cfg)) as computer, open(tmp, "w", encoding="utf-8") as f:
        def flush(batch: list[tuple[Example, list[str], list[Generation]]]) -> None:
            samples = [reward_input_from_example(e, r) for e, responses, _ in batch for r in responses]
            results = iter(computer.compute(samples))
            for example, responses, generations in batch:
                too_long = [_too_long(g, max_response_tokens) for g in generations]
                kept = _select(example, responses, [next(results) for _ in responses], max_per_prompt,
                               min_language, report, too_long)
                report.kept += len(kept)
                report.prompts_without_kept += not kept
                for i in kept:
                    g = generations[i]
                    extra = {k: v for k, v in g.items() if k != "text"} if isinstance(g, dict) else {}
                    f.write(json.dumps(_sft_record(example, responses[i], extra), ensure_ascii=False) + "\n")

        batch: list[tuple[Example, list[str], list[Generation]]] = []
        for example, generations in groups:
            texts = [g["text"] if isinstance(g, dict) else g for g in generations]
            responses = [t if t.startswith(response_prefix) else response_prefix + t for t in texts]
            report.prompts += 1
            report.generations += len(responses)
            batch.append((example, responses, list(generations)))
            if len(batch) >= prompts_per_batch:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    os.replace(tmp, out)
    return report


def read_generations(path: PathLike) -> Iterator[tuple[Example, list[str]]]:
    """``(example, generations)`` from a JSONL of dataset records with a ``"generations"`` list each."""
    for line, obj in read_jsonl(path):
        generations = obj.pop("generations", None)
        if not isinstance(generations, list) or not all(isinstance(g, str) for g in generations):
            raise DataError(path, line, "field 'generations' must be a list of strings (the k sampled responses)")
        yield example_from_record(obj, path, line), generations


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="rejection-sample generations into an SFT JSONL (R1 stage 3)")
    parser.add_argument("generations", help="JSONL: dataset records with a 'generations' list")
    parser.add_argument("output", help="SFT JSONL to write")
    parser.add_argument("--max-per-prompt", type=int, default=4)
    parser.add_argument("--min-language", type=float, default=0.95)
    parser.add_argument("--answer-format", choices=("tag", "boxed"), default="tag")
    parser.add_argument("--language", default="en")
    parser.add_argument("--response-prefix", default="", help='prefilled reply start, e.g. "<think>\\n"')
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    cfg = RewardConfig(num_workers=args.workers, answer_format=args.answer_format,
                       target_language=args.language)
    report = rejection_sample(read_generations(args.generations), args.output, reward_cfg=cfg,
                              max_per_prompt=args.max_per_prompt, min_language=args.min_language,
                              response_prefix=args.response_prefix.encode().decode("unicode_escape"))
    print(json.dumps(report.as_dict(), indent=1))


if __name__ == "__main__":
    main()
