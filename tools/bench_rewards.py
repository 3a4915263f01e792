#!/usr/bin/env python
"""Measure reward throughput (rewards/s) for math, countdown and sandboxed code, serial vs pool.

    python tools/bench_rewards.py                 # all workloads, workers 0 and 2
    python tools/bench_rewards.py --workers 0 4 --math 1024 --code 64

Math samples mimic GRPO groups (several responses per prompt: right, wrong, LaTeX variants, no
answer); code samples have 4 stdin/stdout tests each and include wrong, crashing and looping
programs. Prints one line per (workload, workers) with rewards/s; the pool is warmed up first.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time

from r1mega.config.schema import CodeSandboxConfig, RewardConfig, RewardTermConfig
from r1mega.data.synthetic import countdown_problems
from r1mega.rewards import RewardComputer, RewardInput, isolation


def math_samples(n: int, seed: int = 0) -> list[RewardInput]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        ref = f"\\frac{{{a}}}{{{b}}}"
        style = i % 6
        answer = {0: f"\\frac{{{a}}}{{{b}}}", 1: f"{a}/{b}", 2: f"{a / b:.6f}",
                  3: f"\\frac{{{a + 1}}}{{{b}}}", 4: f"\\dfrac{{{2 * a}}}{{{2 * b}}}", 5: ""}[style]
        body = f"<think>We divide {a} by {b} and simplify the fraction step by step.</think>"
        response = body + (f"<answer>\\boxed{{{answer}}}</answer>" if answer else " I am not sure.")
        out.append(RewardInput(response, ref, "math"))
    return out


def countdown_samples(n: int, seed: int = 0) -> list[RewardInput]:
    problems = countdown_problems(max(1, n // 4), seed)
    out = []
    for i in range(n):
        p = problems[i % len(problems)]
        guess = p.answer if i % 2 else p.answer.replace("+", "-", 1)
        out.append(RewardInput(f"<think>try combinations</think><answer>{guess}</answer>", str(p.target),
                               "countdown", meta={"numbers": list(p.numbers)}))
    return out


CODE = {
    "right": "a, b = map(int, input().split())\nprint(a + b)",
    "wrong": "a, b = map(int, input().split())\nprint(a - b)",
    "crash": "raise SystemExit(input() and 1/0)",
    "loop": "while True:\n    pass",
}


def code_samples(n: int) -> list[RewardInput]:
    tests = [{"input": f"{i} {i * 3}\n", "output": f"{i * 4}\n"} for i in range(1, 5)]
    kinds = ["right", "right", "wrong", "crash"] * 3 + ["loop"]
    return [RewardInput(f"<think>read and add</think><answer>```python\n{CODE[kinds[i % len(kinds)]]}\n```</answer>",
                        data_source="code", tests=tests) for i in range(n)]


def bench(name: str, samples: list[RewardInput], cfg: RewardConfig) -> None:
    with RewardComputer(cfg) as computer:
        computer.compute(samples[: max(2, cfg.num_workers * 2)])  # start and warm the workers
        t0 = time.perf_counter()
        results = computer.compute(samples)
        dt = time.perf_counter() - t0
    mean = sum(r.total for r in results) / len(results)
    print(f"{name:10s} workers={cfg.num_workers}  samples={len(samples):5d}  {dt:7.2f}s  "
          f"{len(samples) / dt:9.1f} rewards/s  mean_reward={mean:.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--math", type=int, default=600, help="math samples (0 skips)")
    parser.add_argument("--countdown", type=int, default=2000, help="countdown samples (0 skips)")
    parser.add_argument("--code", type=int, default=26, help="code samples, 4 tests each (0 skips)")
    parser.add_argument("--code-timeout", type=float, default=1.0, help="sandbox wall time per test (s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"code sandbox isolation: {isolation().mode}")
    fmt = [RewardTermConfig("format", 0.1), RewardTermConfig("language", 0.1)]
    for workers in args.workers:
        if args.math:
            bench("math", math_samples(args.math),
                  RewardConfig(terms=[RewardTermConfig("accuracy", 1.0), *fmt], num_workers=workers))
        if args.countdown:
            bench("countdown", countdown_samples(args.countdown),
                  RewardConfig(terms=[RewardTermConfig("countdown", 1.0), *fmt], num_workers=workers))
        if args.code:
            bench("code", code_samples(args.code),
                  RewardConfig(terms=[RewardTermConfig("code", 1.0), *fmt], num_workers=workers,
                               sandbox=CodeSandboxConfig(wall_timeout_s=args.code_timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
