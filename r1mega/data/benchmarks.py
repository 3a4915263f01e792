"""Benchmark sets from local files in their public layouts -> ``Example``s the eval loop scores.

Three kinds (``BenchmarkConfig.kind``; ``auto`` picks one from the first record's fields):

- ``math`` (MATH-500, AIME): ``problem`` (or ``question``/``prompt``) and ``answer`` (text or an
  integer); without ``answer`` a ``solution`` whose last ``\\boxed{}`` is the answer. Scored by the
  ``accuracy`` reward (math-verify).
- ``choice`` (GPQA): ``Question``, ``Correct Answer``, ``Incorrect Answer 1..3``, shuffled into A-D
  by a seeded RNG keyed on the question (the same letters on every run and in every subset); or
  pre-lettered ``question`` + ``choices``/``options`` (a letter -> text mapping, or a list for A, B,
  ...) + ``answer`` (a letter, or a 0-based index). Scored by the ``choice`` reward (letter extraction).
- ``code``: ``prompt`` (or ``question``/``problem``/``text``/``question_content``) and tests as the
  code sandbox runs them: ``tests`` (``[{"input", "output"}]``, ``[{"assert"}]`` or a list of assert
  strings), MBPP's ``test_list`` (+ ``test_setup_code``), APPS's ``input_output``
  (``{"inputs": [...], "outputs": [...]}``, also as a JSON string) or HumanEval's ``test`` +
  ``entry_point``. Scored by the ``code`` reward (pass = every test passes).

Files are JSONL (one record per line) or JSON (an array of records, or an object holding one).
Every error names the file, the line (JSONL) or record number (JSON) and the layout expected.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from r1mega.config.schema import BenchmarkConfig
from r1mega.config.validate import BENCHMARK_KINDS
from r1mega.data.dataset import Example, example_from_record
from r1mega.data.jsonl import DataError, PathLike, read_jsonl

DATA_SOURCE = {"math": "math", "choice": "multiple_choice", "code": "code"}
INSTRUCTIONS = {  # appended to the question unless BenchmarkConfig.instruction says otherwise
    "math": "Please reason step by step, and put your final answer within \\boxed{}.",  # R1's eval prompt
    "choice": "Think step by step, then give the letter of the correct option as your final answer.",
    "code": "Write a complete Python program that solves the problem, in a ```python code block.",
}
LAYOUTS = {
    "math": "MATH-500/AIME: {problem | question | prompt, answer (text or integer) | solution with \\boxed{}}",
    "choice": "GPQA: {Question, Correct Answer, Incorrect Answer 1, Incorrect Answer 2, Incorrect Answer 3} or "
              "{question, choices | options (letter -> text, or a list), answer (letter or 0-based index)}",
    "code": "{prompt | question | problem | text | question_content, plus tests: tests ([{input, output}], "
            "[{assert}] or assert strings) | test_list (MBPP) | input_output (APPS) | test + entry_point "
            "(HumanEval)}",
}
EXTRA_KEYS = ("subject", "level", "type", "difficulty", "Subdomain", "High-level domain")  # kept in meta
_QUESTION_KEYS = {"math": ("problem", "question", "prompt", "Problem", "Question"),
                  "choice": ("Question", "question", "prompt", "problem"),
                  "code": ("prompt", "question", "problem", "text", "question_content")}
_ID_KEYS = ("id", "unique_id", "ID", "Record ID", "task_id", "problem_id", "question_id")
GPQA_WRONG = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


class _Where:
    """Where a record came from: ``path:line`` for JSONL, ``path: record N`` for JSON."""

    def __init__(self, path: PathLike, line: Optional[int] = None, record: Optional[int] = None):
        self.path, self.line, self.record = str(path), line, record

    def error(self, problem: str) -> DataError:
        prefix = f"record {self.record}: " if self.record is not None else ""
        return DataError(self.path, self.line, prefix + problem)

    def label(self) -> str:
        return f"{self.path}:{self.line}" if self.line is not None else f"{self.path}#{self.record}"


def read_records(path: PathLike) -> Iterator[tuple[_Where, dict[str, Any]]]:
    """Records of a ``.jsonl`` (streamed) or ``.json`` file (an array, or an object with one array)."""
    file = Path(path)
    if file.suffix.lower() != ".json":
        for line, obj in read_jsonl(file):
            yield _Where(path, line=line), obj
        return
    if not file.is_file():
        raise DataError(path, None, f"file does not exist (resolved to {file.resolve()}); check the path")
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(path, exc.lineno, f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(path, None, "expected a JSON array of records (or an object holding exactly one "
                                        f"array), got an object with keys {sorted(data)[:8]}")
        data = lists[0]
    if not isinstance(data, list) or not data:
        raise DataError(path, None, "expected a non-empty JSON array of records {...}")
    for i, obj in enumerate(data, 1):
        if not isinstance(obj, dict):
            raise _Where(path, record=i).error(f"expected a JSON object, got a {type(obj).__name__}")
        yield _Where(path, record=i), obj


def detect_kind(record: dict[str, Any]) -> Optional[str]:
    """``math``/``choice``/``code`` from a record's field names, ``None`` when it fits none."""
    if "Correct Answer" in record or "choices" in record or "options" in record:
        return "choice"
    humaneval = "test" in record and "entry_point" in record
    if humaneval or any(k in record for k in ("tests", "test_list", "input_output")):
        return "code"
    if any(k in record for k in _QUESTION_KEYS["math"]) and ("answer" in record or "solution" in record):
        return "math"
    return None


def _text(record: dict, keys: tuple[str, ...], where: _Where, kind: str, what: str) -> str:
    for key in keys:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    raise where.error(f"missing {what}: none of the fields {list(keys)} is a non-empty string; "
                      f"a {kind} benchmark record looks like {LAYOUTS[kind]}")


def _math(record: dict, where: _Where) -> dict:
    answer = record.get("answer", record.get("Answer"))
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        answer = record.get("solution")  # the accuracy reward reduces a solution to its last \boxed{}
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
        raise where.error(f"missing field 'answer' (or a 'solution' with \\boxed{{}}); a math benchmark record "
                          f"looks like {LAYOUTS['math']}")
    question = _text(record, _QUESTION_KEYS["math"], where, "math", "the problem")
    return {"prompt": question, "answer": str(answer).strip()}


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _gpqa_options(record: dict, where: _Where, seed: int, question: str) -> tuple[dict[str, str], str]:
    texts = []
    for key in ("Correct Answer", *GPQA_WRONG):
        value = record.get(key)
        if not isinstance(value, (str, int, float)) or not str(value).strip():
            raise where.error(f"missing field {key!r}; a GPQA record looks like {LAYOUTS['choice']}")
        texts.append(str(value).strip())
    order = list(range(len(texts)))
    random.Random(f"{seed}:{question}").shuffle(order)  # keyed on the question: stable in any subset
    choices = dict(zip(_letters(len(texts)), (texts[i] for i in order)))
    return choices, _letters(len(texts))[order.index(0)]


def _lettered_options(record: dict, where: _Where) -> tuple[dict[str, str], str]:
    raw = record.get("choices", record.get("options"))
    if isinstance(raw, list) and raw and len(raw) <= 26:
        choices = dict(zip(_letters(len(raw)), (str(c).strip() for c in raw)))
    elif isinstance(raw, dict) and raw and all(isinstance(k, str) and len(k) == 1 and k.isupper() for k in raw):
        choices = {k: str(v).strip() for k, v in sorted(raw.items())}
    else:
        raise where.error(f"field 'choices' must be a list of option texts or a mapping of upper-case letters to "
                          f"texts, got {str(raw)[:80]}; a multiple-choice record looks like {LAYOUTS['choice']}")
    answer = record.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        answer = _letters(len(choices))[answer]
    if not isinstance(answer, str) or answer.strip().upper() not in choices:
        raise where.error(f"field 'answer' must be one of the letters {list(choices)} (or a 0-based index), "
                          f"got {answer!r}")
    return choices, answer.strip().upper()


def _choice(record: dict, where: _Where, seed: int) -> dict:
    question = _text(record, _QUESTION_KEYS["choice"], where, "choice", "the question")
    if "Correct Answer" in record:
        choices, letter = _gpqa_options(record, where, seed, question)
    elif "choices" in record or "options" in record:
        choices, letter = _lettered_options(record, where)
    else:
        raise where.error(f"missing field 'Correct Answer' (GPQA) or 'choices' (lettered options); a "
                          f"multiple-choice record looks like {LAYOUTS['choice']}")
    options = "\n".join(f"{k}) {v}" for k, v in choices.items())
    return {"prompt": f"{question}\n\n{options}", "answer": letter, "choices": choices}


def _code_tests(record: dict, where: _Where) -> Any:
    if "tests" in record:
        tests = record["tests"]
        return [{"assert": t} if isinstance(t, str) else t for t in tests] if isinstance(tests, list) else tests
    if "test_list" in record:
        setup = record.get("test_setup_code") or ""
        return [{"assert": (setup + "\n" + t) if setup else t} for t in record["test_list"]]
    if "input_output" in record:
        io = record["input_output"]
        try:
            io = json.loads(io) if isinstance(io, str) else io
        except json.JSONDecodeError:
            raise where.error("field 'input_output' is a string but not valid JSON") from None
        if not isinstance(io, dict) or io.get("fn_name") or len(io.get("inputs", [])) != len(io.get("outputs", [])):
            raise where.error("field 'input_output' must be {\"inputs\": [stdin...], \"outputs\": [stdout...]} of "
                              "equal length (call-based 'fn_name' problems are not supported: use 'tests' "
                              "with assert statements)")
        return [{"input": _joined(i), "output": _joined(o)} for i, o in zip(io["inputs"], io["outputs"])]
    if "test" in record and "entry_point" in record:
        return [{"assert": f"{record['test']}\n\ncheck({record['entry_point']})"}]
    raise where.error(f"no tests; a code benchmark record looks like {LAYOUTS['code']}")


def _joined(value: Any) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _code(record: dict, where: _Where) -> dict:
    return {"prompt": _text(record, _QUESTION_KEYS["code"], where, "code", "the problem statement"),
            "tests": _code_tests(record, where)}


def _to_example(record: dict, kind: str, where: _Where, bench: BenchmarkConfig) -> Example:
    if kind == "choice":
        fields = _choice(record, where, bench.seed)
    else:
        fields = _math(record, where) if kind == "math" else _code(record, where)
    instruction = INSTRUCTIONS[kind] if bench.instruction is None else bench.instruction
    if instruction:
        fields["prompt"] = f"{fields['prompt']}\n\n{instruction}"
    ident = next((record[k] for k in _ID_KEYS if record.get(k) is not None), None)
    out = {**fields, "data_source": DATA_SOURCE[kind], **{k: record[k] for k in EXTRA_KEYS if k in record}}
    if ident is not None:
        out["id"] = str(ident)
    try:
        example = example_from_record(out, where.path, where.line or 0)
    except DataError as exc:  # e.g. malformed tests: re-anchor at the JSON record
        raise where.error(exc.problem) from None
    example.where = where.label()
    return example


def load_benchmark(bench: BenchmarkConfig, max_problems: int = 0) -> tuple[str, list[Example]]:
    """``(kind, examples)`` of one benchmark file; ``max_problems`` (0 = all) applies when the
    benchmark sets none itself."""
    if bench.kind not in BENCHMARK_KINDS + ("auto",):
        raise DataError(bench.path, None, f"benchmark {bench.name!r}: kind {bench.kind!r} is not one of "
                                          f"{list(BENCHMARK_KINDS)} (or auto)")
    limit = bench.max_problems or max_problems
    kind = None if bench.kind == "auto" else bench.kind
    examples: list[Example] = []
    for where, record in read_records(bench.path):
        if kind is None:
            kind = detect_kind(record)
            if kind is None:
                raise where.error(f"benchmark {bench.name!r}: cannot tell the layout from the fields "
                                  f"{sorted(record)[:10]}; expected one of: " + "; ".join(
                                      f"{k}: {v}" for k, v in LAYOUTS.items()) + f", or give the kind "
                                  f"({bench.name}=path:math|choice|code)")
        examples.append(_to_example(record, kind, where, bench))
        if limit and len(examples) >= limit:
            break
    assert kind is not None  # read_records raises on an empty file
    return kind, examples


def parse_benchmarks(spec: str) -> list[BenchmarkConfig]:
    """``name=path[:kind],...`` (the ``--benchmarks`` flag) -> configs; a path may itself contain ``:``."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, eq, rest = item.partition("=")
        if not eq or not name.strip() or not rest.strip():
            raise ValueError(f"--benchmarks item {item!r}: write name=path[:kind], e.g. "
                             f"aime=data/aime24.jsonl:math,gpqa=data/gpqa_diamond.json")
        path, colon, kind = rest.rpartition(":")
        if not colon or kind not in BENCHMARK_KINDS + ("auto",):
            path, kind = rest, "auto"
        out.append(BenchmarkConfig(name=name.strip(), path=path.strip(), kind=kind))
    if not out:
        raise ValueError("--benchmarks is empty: write name=path[:kind],...")
    return out
