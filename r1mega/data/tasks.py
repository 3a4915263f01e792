"""Synthetic verifiable tasks as dataset ``Example``s with disjoint train/eval splits (CPU demo, tests).

``arithmetic`` and ``addition`` are scored by the ``accuracy`` reward, ``countdown`` by the
``countdown`` reward (the record carries ``numbers``). ``write_task_splits`` writes the JSONL files
the regular dataset reader loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Union

from r1mega.config.paths import SYNTHETIC_PREFIX, is_synthetic  # noqa: F401  (is_synthetic: re-exported)
from r1mega.data.dataset import Example
from r1mega.data.jsonl import PathLike, write_jsonl
from r1mega.data.synthetic import (
    CountdownProblem,
    Problem,
    addition_problems,
    arithmetic_problems,
    countdown_problems,
    split_train_eval,
)

TASKS = ("addition", "arithmetic", "countdown")


def to_example(problem: Union[Problem, CountdownProblem], index: int, task: str) -> Example:
    if isinstance(problem, CountdownProblem):
        return Example(prompt=problem.prompt, answer=str(problem.target), data_source="countdown",
                       id=f"{task}-{index}", meta={"numbers": list(problem.numbers), "solution": problem.answer})
    return Example(prompt=problem.prompt, answer=problem.answer, data_source="arithmetic", id=f"{task}-{index}")


def task_splits(task: str, count: int, seed: int = 0, eval_fraction: float = 0.1, digits: int = 3,
                ops: str = "+-*", num_numbers: int = 3) -> tuple[list[Example], list[Example]]:
    """``(train, eval)`` examples of a synthetic task, split by prompt (no eval prompt is trained on)."""
    if task == "addition":
        problems: list = addition_problems(count, digits, seed)
    elif task == "arithmetic":
        problems = arithmetic_problems(count, digits, seed, ops)
    elif task == "countdown":
        problems = countdown_problems(count, seed, num_numbers=num_numbers)
    else:
        raise ValueError(f"unknown synthetic task {task!r}: use one of {TASKS}")
    train, held_out = split_train_eval(problems, eval_fraction)
    return ([to_example(p, i, task) for i, p in enumerate(train)],
            [to_example(p, i, task) for i, p in enumerate(held_out)])


def synthetic_examples(spec: str, split: str = "train", seed: int = 0, count: int = 4000) -> list[Example]:
    """Examples for a data spec ``synthetic:<task>[:<digits>]`` (e.g. ``synthetic:addition:2``).

    ``split`` is ``train`` or ``eval`` (disjoint, 10% held out). Prompts lose their trailing ``=``:
    they are the user turn of a chat template (``12+34``), as in the CPU demo.
    """
    parts = str(spec)[len(SYNTHETIC_PREFIX):].split(":")
    task = parts[0]
    if task not in TASKS or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"data spec {spec!r}: use synthetic:<task>[:<digits>] with task in {TASKS}, "
                         f"e.g. synthetic:addition:2, or a JSONL path")
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: use 'train' or 'eval'")
    kwargs = {"digits": int(parts[1])} if len(parts) == 2 else {}
    train, held_out = task_splits(task, count, seed=seed, eval_fraction=0.1, **kwargs)
    out = train if split == "train" else held_out
    for e in out:
        if e.data_source == "arithmetic":
            e.prompt = e.prompt.rstrip("= ")
    return out


def write_task_splits(task: str, out_dir: PathLike, count: int, seed: int = 0, eval_fraction: float = 0.1,
                      **kwargs) -> tuple[Path, Path]:
    """Write ``<out_dir>/<task>_train.jsonl`` and ``<task>_eval.jsonl``; returns both paths."""
    train, held_out = task_splits(task, count, seed, eval_fraction, **kwargs)
    out = Path(out_dir)
    paths = out / f"{task}_train.jsonl", out / f"{task}_eval.jsonl"
    write_jsonl(paths[0], (e.to_record() for e in train))
    write_jsonl(paths[1], (e.to_record() for e in held_out))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write a synthetic verifiable task as train/eval JSONL")
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    for path in write_task_splits(args.task, args.out_dir, args.count, args.seed, args.eval_fraction):
        print(path)


if __name__ == "__main__":
    main()
