"""Prompt datasets: JSONL records -> validated ``Example``s, and seeded sampling by global position.

A record is ``{"prompt": str}`` or ``{"messages": [{"role", "content"}, ...]}``, plus what the
reward for its ``data_source`` needs: ``"answer"`` (math, arithmetic, countdown target),
``"tests"`` (code: ``[{"input", "output"}]`` or ``[{"assert"}]``), ``"numbers"`` (countdown).
Optional ``"id"``; every other key is kept in ``Example.meta``. Missing or mistyped fields raise
``DataError`` naming ``file:line``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from r1mega.data.jsonl import DataError, PathLike, read_jsonl

ROLES = ("system", "user", "assistant")
KNOWN_KEYS = ("prompt", "messages", "answer", "tests", "data_source", "id")


@dataclass
class Example:
    """One prompt with its reference (answer or tests) and routing tag."""

    prompt: Optional[str] = None
    messages: Optional[list[dict[str, str]]] = None
    answer: Optional[str] = None
    tests: Optional[list[dict[str, Any]]] = None
    data_source: str = "math"
    id: Optional[str] = None
    meta: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # "path:line" it came from, for messages further downstream

    def chat(self) -> list[dict[str, str]]:
        """The conversation to render with a chat template."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]

    def to_record(self) -> dict[str, Any]:
        """The JSONL record this example reads back from (``example_from_record`` inverse)."""
        record: dict[str, Any] = {}
        if self.messages is not None:
            record["messages"] = self.messages
        else:
            record["prompt"] = self.prompt
        for key in ("answer", "tests", "id"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key)
        record["data_source"] = self.data_source
        record.update(self.meta)
        return record


def _fail(path: PathLike, line: int, problem: str) -> DataError:
    return DataError(path, line, problem)


def _messages(value: Any, path: PathLike, line: int) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _fail(path, line, "field 'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise _fail(path, line, f"messages[{i}] must be an object with 'role' in {ROLES} and a string "
                                    f"'content', got {str(m)[:80]}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _tests(value: Any, path: PathLike, line: int) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _fail(path, line, "field 'tests' must be a non-empty list of {\"input\", \"output\"} or "
                                "{\"assert\"} objects")
    for i, case in enumerate(value):
        ok = isinstance(case, dict) and (("input" in case and "output" in case) or "assert" in case)
        if not ok:
            raise _fail(path, line, f"tests[{i}] must have 'input' and 'output' (stdin/stdout) or 'assert' "
                                    f"(python run after the program), got {str(case)[:80]}")
    return value


def example_from_record(obj: dict[str, Any], path: PathLike = "<record>", line: int = 0,
                        need_reference: bool = True) -> Example:
    """Validate one record; ``need_reference`` requires what the data source's reward checks against."""
    source = obj.get("data_source", "math")
    if not isinstance(source, str) or not source:
        raise _fail(path, line, f"field 'data_source' must be a non-empty string, got {source!r}")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if prompt is None and messages is None:
        raise _fail(path, line, "missing field 'prompt' (or 'messages'): every record needs the question")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise _fail(path, line, f"field 'prompt' must be a non-empty string, got {str(prompt)[:80]!r}")
    if messages is not None:
        messages = _messages(messages, path, line)
    answer = obj.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise _fail(path, line, f"field 'answer' must be a string or a number, got {type(answer).__name__}")
        answer = str(answer)
    tests = _tests(obj["tests"], path, line) if obj.get("tests") is not None else None
    if need_reference:
        if source == "code" and tests is None:
            raise _fail(path, line, "missing field 'tests' (data_source 'code' is scored by running them)")
        if source != "code" and (answer is None or not answer.strip()):
            raise _fail(path, line, f"missing field 'answer' (the reference answer data_source {source!r} is "
                                    f"checked against); add it, or set 'data_source' to 'code' with 'tests'")
    if source == "countdown" and need_reference:
        numbers = obj.get("numbers")
        if not isinstance(numbers, list) or not all(isinstance(n, int) for n in numbers):
            raise _fail(path, line, "countdown record needs 'numbers': a list of integers")
    meta = {k: v for k, v in obj.items() if k not in KNOWN_KEYS}
    ident = obj.get("id")
    return Example(prompt, messages, answer, tests, source, None if ident is None else str(ident), meta,
                   f"{path}:{line}")


def iter_examples(path: PathLike, need_reference: bool = True, start: int = 0) -> Iterator[Example]:
    """Stream validated examples from a JSONL file, skipping the first ``start`` records (resume)."""
    for index, (line, obj) in enumerate(read_jsonl(path)):
        if index >= start:
            yield example_from_record(obj, path, line, need_reference)


def load_examples(path: PathLike, need_reference: bool = True) -> list[Example]:
    return list(iter_examples(path, need_reference))


class PromptDataset:
    """Examples served in a seeded shuffled order that depends only on the global sample position.

    ``at(i)`` is example ``perm_e[i % n]`` of epoch ``e = i // n``: resuming at a saved position gives
    the same stream whatever the data-parallel size, and every epoch is a fresh permutation.
    """

    def __init__(self, examples: Sequence[Example], seed: int = 0, shuffle: bool = True):
        if not examples:
            raise ValueError("PromptDataset needs at least one example")
        self.examples, self.seed, self.shuffle = list(examples), seed, shuffle
        self._epoch, self._perm = -1, list(range(len(self.examples)))

    def __len__(self) -> int:
        return len(self.examples)

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            perm = list(range(len(self.examples)))
            if self.shuffle:
                random.Random(f"{self.seed}:{epoch}").shuffle(perm)
            self._epoch, self._perm = epoch, perm
        return self._perm

    def at(self, position: int) -> Example:
        epoch, index = divmod(position, len(self.examples))
        return self.examples[self._permutation(epoch)[index]]

    def batch(self, position: int, size: int) -> list[Example]:
        return [self.at(position + i) for i in range(size)]
