"""Several benchmarks (math, multiple choice, code) in one eval run -> one JSON report + a markdown table.

Each benchmark is generated and scored with ``train/evaluate.py`` (same pass@1, cons@k, format and
length definitions as every other eval) with its own ``k``. cons@k for a **code** benchmark is
``null`` (``n/a`` in the table): a program has no final answer that samples could agree on, and
voting over program outputs would need inputs the tests do not define. The report is written as
``<out>.json`` (per benchmark: kind, path, problems, k, pass@1, cons@k, format rate, response length,
samples file) and ``<out>.md``; every response is kept in ``<out stem>_<benchmark>_samples.jsonl``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from r1mega.config.schema import BenchmarkConfig
from r1mega.data.benchmarks import load_benchmark
from r1mega.data.dataset import Example
from r1mega.train.evaluate import EvalProblem, ScoredSample, generate_and_score, make_problems, write_samples

CONS_NOTE = ("pass@1: mean over problems of the mean correctness of k samples. cons@k: the majority-voted "
             "answer of the same k samples (multiple choice: the extracted letter); n/a for code, where "
             "programs have no comparable final answer. format rate: share of samples in the strict R1 "
             "template. response length: mean generated tokens.")


@dataclass
class LoadedBenchmark:
    config: BenchmarkConfig
    kind: str  # math | choice | code (resolved from "auto")
    examples: list[Example]
    problems: list[EvalProblem] = field(default_factory=list)  # rendered prompts (render_problems)


@dataclass
class BenchmarkResult:
    bench: LoadedBenchmark
    k: int
    metrics: dict  # summarize_eval's keys without prefix: pass@1, format, response_len[, cons@k]
    problems: list[EvalProblem]
    groups: list[list[ScoredSample]]
    texts: list[list[str]]

    def row(self) -> dict:
        """The report's entry for this benchmark."""
        m = self.metrics
        return {"kind": self.bench.kind, "path": self.bench.config.path, "problems": len(self.problems),
                "k": self.k, "pass@1": m["pass@1"], "cons@k": m.get("cons@k"), "format_rate": m["format"],
                "response_len": m["response_len"]}


def load_benchmarks(benches: Sequence[BenchmarkConfig], max_problems: int = 0) -> list[LoadedBenchmark]:
    """Read every benchmark file up front, so a bad file fails before any model is loaded."""
    return [LoadedBenchmark(b, *load_benchmark(b, max_problems)) for b in benches]


def render_problems(loaded: Sequence[LoadedBenchmark], tokenizer, template: str = "r1",
                    max_prompt_tokens: Optional[int] = None) -> None:
    """Render and tokenize every prompt (before the engine starts: a too-long prompt fails early)."""
    for bench in loaded:
        bench.problems = make_problems(bench.examples, tokenizer, template, max_prompt_tokens)


def run_benchmarks(engine, judge, loaded: Sequence[LoadedBenchmark], k: int, sampling, tokenizer,
                   math_timeout_s: int = 5) -> list[BenchmarkResult]:
    """Generate ``bench.k or k`` samples per problem of each (rendered) benchmark and score them."""
    out = []
    for bench in loaded:
        if len(bench.problems) != len(bench.examples):
            raise ValueError(f"benchmark {bench.config.name!r} has no rendered prompts: call render_problems first")
        bk = bench.config.k or k
        metrics, groups, texts = generate_and_score(engine, judge, bench.problems, bk, sampling, tokenizer,
                                                    math_timeout_s, prefix="")
        out.append(BenchmarkResult(bench, bk, metrics, bench.problems, groups, texts))
    return out


def _cell(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: dict[str, dict]) -> str:
    """One row per benchmark, then the definitions (what cons@k means, why code has none)."""
    lines = ["| benchmark | kind | problems | k | pass@1 | cons@k | format rate | response length |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['kind']} | {r['problems']} | {r['k']} | {_cell(r['pass@1'])} | "
                     f"{_cell(r['cons@k'])} | {_cell(r['format_rate'])} | {_cell(r['response_len'], 1)} |")
    return "\n".join(lines) + "\n\n" + CONS_NOTE + "\n"


def write_benchmark_report(path: Path, results: Sequence[BenchmarkResult], meta: dict) -> dict:
    """``<path>`` (JSON), ``<path>.md`` (the table) and one samples file per benchmark; returns the report."""
    path = Path(path)
    rows = {}
    for r in results:
        samples = path.with_name(f"{path.stem}_{r.bench.config.name}_samples.jsonl")
        rows[r.bench.config.name] = {**r.row(), "samples_file": str(write_samples(samples, r.problems, r.groups,
                                                                                   r.texts))}
    table = markdown_table(rows)
    md = path.with_suffix(".md")
    md.write_text(table)
    report = {**meta, "benchmarks": rows, "markdown": str(md), "notes": CONS_NOTE}
    path.write_text(json.dumps(report, indent=2))
    return {**report, "table": table}
