#!/usr/bin/env python
"""Measure reward throughput (rewards/s) for math, countdown and sandboxed code, serial vs pool.

    python tools/bench_rewards.py                 # all workloads, workers 0 and 2
    python tools/bench_rewards.py --workers 0 4 --math 1024 --code 64
    python tools/bench_rewards.py --math 0 --countdown 0 --workers 0   # code only: sandbox view cost

Math samples mimic GRPO groups (several responses per prompt: right, wrong, LaTeX variants, no
answer); code samples have 4 stdin/stdout tests each and include wrong, crashing and looping
programs. Prints one line per (workload, workers) with rewards/s; the pool is warmed up first.
The code row runs once per sandbox filesystem mode (``--code-filesystem``, default: none, then each
builder available here), with its ratio to ``none``; the last line is the filesystem view's cost per
program (median wall time of a trivial program, modes interleaved, minus ``none``'s).
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import time

from r1mega.config.schema import CodeSandboxConfig, RewardConfig, RewardTermConfig
from r1mega.data.synthetic import countdown_problems
from r1mega.rewards import RewardComputer, RewardInput, isolation, run_python
from r1mega.rewards.sandbox_fs import FILESYSTEMS


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


def sandbox_cfg(filesystem: str, wall_timeout_s: float = 5.0) -> CodeSandboxConfig:
    """``none`` is the host's view, so it must not require the filesystem layer."""
    return CodeSandboxConfig(wall_timeout_s=wall_timeout_s, filesystem=filesystem,
                             require_isolation=filesystem != "none")


def code_modes(wanted: list[str]) -> list[str]:
    """The wanted filesystem modes this machine can run (``none`` always); the others are reported."""
    out = []
    for mode in wanted:
        iso = isolation(True, mode)
        if mode == "none" or iso.filesystem == mode:
            out.append(mode)
            print(f"code sandbox filesystem={mode}: isolation {iso.mode}")
        else:
            print(f"code sandbox filesystem={mode}: not available here ({iso.missing})")
    return out


def program_cost_ms(modes: list[str], n: int) -> dict[str, tuple[float, float]]:
    """Per mode, (median, min) wall ms of one trivial program, modes interleaved so load drift hits all
    alike; the min is the closest to the uncontended cost on a shared machine. (Not CPU time: bwrap's
    outer process does not collect its namespace's CPU time.)"""
    walls: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(n):
        for mode in modes:
            result = run_python("print(1)", "", sandbox_cfg(mode))
            assert result.stdout == "1\n", result
            walls[mode].append(1e3 * result.wall_s)
    return {m: (statistics.median(w), min(w)) for m, w in walls.items()}


def bench(name: str, samples: list[RewardInput], cfg: RewardConfig) -> float:
    with RewardComputer(cfg) as computer:
        computer.compute(samples[: max(2, cfg.num_workers * 2)])  # start and warm the workers
        t0 = time.perf_counter()
        results = computer.compute(samples)
        dt = time.perf_counter() - t0
    mean = sum(r.total for r in results) / len(results)
    print(f"{name:10s} workers={cfg.num_workers}  samples={len(samples):5d}  {dt:7.2f}s  "
          f"{len(samples) / dt:9.1f} rewards/s  mean_reward={mean:.3f}", flush=True)
    return len(samples) / dt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--math", type=int, default=600, help="math samples (0 skips)")
    parser.add_argument("--countdown", type=int, default=2000, help="countdown samples (0 skips)")
    parser.add_argument("--code", type=int, default=26, help="code samples, 4 tests each (0 skips)")
    parser.add_argument("--code-timeout", type=float, default=1.0, help="sandbox wall time per test (s)")
    parser.add_argument("--code-filesystem", nargs="+", default=["none", *FILESYSTEMS],
                        choices=["none", *FILESYSTEMS], help="sandbox filesystem modes for the code row")
    parser.add_argument("--programs", type=int, default=30, help="trivial programs per mode for the cost line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    modes = code_modes(args.code_filesystem) if args.code else []
    fmt = [RewardTermConfig("format", 0.1), RewardTermConfig("language", 0.1)]
    for workers in args.workers:
        if args.math:
            bench("math", math_samples(args.math),
                  RewardConfig(terms=[RewardTermConfig("accuracy", 1.0), *fmt], num_workers=workers))
        if args.countdown:
            bench("countdown", countdown_samples(args.countdown),
                  RewardConfig(terms=[RewardTermConfig("countdown", 1.0), *fmt], num_workers=workers))
        rates = {}
        for mode in modes:
            rates[mode] = bench(f"code[{mode}]", code_samples(args.code),
                                RewardConfig(terms=[RewardTermConfig("code", 1.0), *fmt], num_workers=workers,
                                             sandbox=sandbox_cfg(mode, args.code_timeout)))
        if "none" in rates:
            print("  code rewards/s vs filesystem=none: " + ", ".join(
                f"{m} x{r / rates['none']:.2f}" for m, r in rates.items() if m != "none"))
    if modes and args.programs:
        ms = program_cost_ms(modes, args.programs)
        print(f"per-program wall over {args.programs} runs: " + ", ".join(
            f"{m} median {med:.1f} ms / min {low:.1f} ms" for m, (med, low) in ms.items()))
        if "none" in ms and len(ms) > 1:
            base_med, base_low = ms["none"]
            print("filesystem view cost per program (aim < 50 ms): " + ", ".join(
                f"{m} {med - base_med:+.1f} ms median ({low - base_low:+.1f} ms min)"
                for m, (med, low) in ms.items() if m != "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
