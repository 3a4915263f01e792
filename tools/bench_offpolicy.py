"""Wall time per GRPO step: colocated vs one-step-off-policy, the demo model, measured in one run.

Why: one-step-off (``rollout.mode=one_step_off``) exists to overlap generation with training; this
measures what the overlap buys on this machine, with the project's own loops (``run_grpo`` and
``engine_loop`` / ``run_one_step_off``), not a copy of them.

Both modes run ``configs/demo_cpu.yaml`` (tiny Qwen3-MoE, 2-digit addition, vLLM-CPU rollouts) from the
same seeded initial weights (optionally after ``--sft-steps`` of the demo's cold-start SFT, the same in
both), the same tokenizer, batch and sampling settings, for ``--steps`` GRPO steps:

- ``colocated``: 2 learner processes (data parallel); the vLLM engine is a child process of rank 0 and
  generates while the learners wait, then they train while it waits (3 processes, 2 busy at most).
- ``one_step_off``: 2 learner processes (data parallel) + 1 engine rank (its vLLM engine is again a child
  process), one launcher world of 3; batch k+1 is generated while batch k trains.

Every process runs one thread (``OMP_NUM_THREADS=1``), so the learners use the same cores in both modes;
one-step-off adds a busy engine thread during training. On a machine with fewer cores than busy threads
(2 cores here: 2 learner threads + 1 engine thread) the overlap is bounded by the cores, not by the
schedule: the ideal ``(rollout + train) / max(rollout, train)`` is printed as ``overlap_bound``.

    PYTHONPATH=. python tools/bench_offpolicy.py [--steps 10] [--sft-steps 0] [--out DIR] [KEY=VALUE ...]

``KEY=VALUE`` are config overrides applied to both modes (e.g. ``rollout.max_new_tokens=16``). Per mode
one line ``mode=<m> procs=... s_per_step=<mean after the first> s_per_step_median=... first_step_s=...
rollout_s=... reward_s=... train_s=... wait_s=... push_s=...`` (means over the steps after the first;
``wait_s`` = the learners' wait for the batch, ``push_s`` = weights to the engine); then
``overlap_bound=``, ``offpolicy_speedup_median=`` and, last,
``offpolicy_speedup=<colocated s/step / one-step-off s/step>`` (means). The first step is reported apart: in
one-step-off mode it includes the engine rank's vLLM start-up (the engine starts when the learners send
the set-up message), colocated starts its engine before the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

MODES = ("colocated", "one_step_off")
LEARNERS = 2  # learner processes in both modes
# per-step record fields (rank 0's history) -> the reported phase; one-step-off's rollout runs on the engine rank
FIELDS = {
    "colocated": {"rollout": "time/rollout", "reward": "time/reward", "train": "time/train",
                  "wait": "time/wait_rollout", "push": "time/refit"},
    "one_step_off": {"rollout": "time/engine_rollout", "reward": "time/engine_reward", "train": "time/train",
                     "wait": "time/wait_rollout", "push": "time/push"},
}


def layout(mode: str) -> tuple[int, str]:
    """(launcher world size, description) of a mode."""
    if mode == "colocated":
        return LEARNERS, f"{LEARNERS} learners (dp{LEARNERS}), engine = child of rank 0"
    return LEARNERS + 1, f"{LEARNERS} learners (dp{LEARNERS}) + 1 engine rank (engine = its child)"


def mode_overrides(mode: str, user: list[str]) -> list[str]:
    extra = ["rollout.mode=one_step_off", "rollout.engine_ranks=1"] if mode == "one_step_off" else []
    # no evals; no TensorBoard (only the colocated loop's MetricsLogger would write it)
    return ["trainer.eval_interval=0", "logging.tensorboard=false", *user, *extra]


# ----------------------------------------------------------------------------- rank program


def rank_main(spec: dict) -> None:
    """One rank of one mode's run (spawned by ``main``); learner rank 0 writes ``spec['report']``."""
    from r1mega.cli import DEMO_CONFIG
    from r1mega.config import load_config
    from r1mega.platform.distributed import launch_env

    world = launch_env()
    mode, out = spec["mode"], Path(spec["root"])
    cfg = load_config(DEMO_CONFIG, spec["overrides"], world_size=world.world_size)
    engine_env = {"VLLM_CACHE_ROOT": str(out / "vllm-cache"), "OMP_NUM_THREADS": "1"}
    role = None
    if mode == "one_step_off":
        from r1mega.platform.disaggregated import split_world

        role = split_world(cfg.rollout.engine_ranks, timeout_minutes=cfg.parallel.timeout_minutes, env=world)
        if not role.is_learner:
            from r1mega.train.offpolicy import engine_loop

            engine_loop(cfg, role, spec["steps"], engine_env=engine_env)
            return
    else:
        from r1mega.platform.distributed import init_process_group

        init_process_group(timeout_minutes=cfg.parallel.timeout_minutes)

    import torch.distributed as dist

    from r1mega.bridge.hf_dir import save_hf
    from r1mega.data.tasks import task_splits
    from r1mega.data.tokenizer import HFTokenizer
    from r1mega.platform.distributed import init_model_parallel, shutdown
    from r1mega.train.model_setup import build_training_model
    from r1mega.train.r1_demo import make_prompts, set_lr

    init_model_parallel(cfg.parallel, seed=cfg.model.seed)
    train, _ = task_splits("addition", 4000, seed=cfg.data.seed, eval_fraction=0.1, digits=2)  # the demo's
    tok_dir = Path(spec["tokenizer_dir"])
    tokenizer = HFTokenizer(tok_dir)
    tm = build_training_model(cfg.model, cfg.parallel, cfg.optimizer, total_steps=spec["sft_steps"] + spec["steps"])
    if spec["sft_steps"]:
        from r1mega.train.sft import build_rows, run_sft

        set_lr(tm, spec["sft_lr"])
        run_sft(tm, build_rows(train, tokenizer, cfg.model.seq_length, multiple=cfg.parallel.tp),
                steps=spec["sft_steps"], global_batch_size=cfg.trainer.global_batch_size,
                micro_batch_size=cfg.parallel.micro_batch_size, valid_vocab=cfg.model.vocab_size, seed=cfg.data.seed)
        set_lr(tm, cfg.optimizer.lr)
    hf_dir = out / "hf_init"
    save_hf(tm.module, tm.config, cfg.model, hf_dir, tokenizer_dir=tok_dir)
    prompts = make_prompts(train, tokenizer)
    per_step = max(1, cfg.trainer.global_batch_size // cfg.rollout.n)
    t0 = time.monotonic()
    if mode == "one_step_off":
        from r1mega.train.offpolicy import run_one_step_off

        result = run_one_step_off(cfg, role, tm, tokenizer, prompts, steps=spec["steps"], prompts_per_step=per_step,
                                  out_dir=out, hf_dir=hf_dir, tokenizer_dir=tok_dir)
    else:
        from r1mega.rollout import build_engine
        from r1mega.train.grpo import run_grpo
        from r1mega.train.metrics import MetricsLogger

        engine = build_engine(hf_dir, cfg.rollout, in_process=False, env=engine_env) if dist.get_rank() == 0 else None
        t0 = time.monotonic()  # the engine is up: colocated steps start here
        metrics = MetricsLogger(out, cfg.logging, rank=dist.get_rank(), log_interval=1, progress=False)
        try:
            result = run_grpo(cfg, tm, engine, tokenizer, prompts, steps=spec["steps"], prompts_per_step=per_step,
                              out_dir=out, metrics=metrics)
        finally:
            metrics.close()
            if engine is not None:
                engine.close()
    loop_s = time.monotonic() - t0
    if dist.get_rank() == 0:
        Path(spec["report"]).write_text(json.dumps({"mode": mode, "world": world.world_size,
                                                    "learners": dist.get_world_size(), "loop_s": loop_s,
                                                    "history": result["history"]}))
    dist.barrier()
    shutdown()


# ----------------------------------------------------------------------------- driver


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(mode: str, history: list[dict]) -> dict:
    """Per-phase means over the steps after the first (the first step alone when there is only one)."""
    if not history:
        raise ValueError(f"{mode}: the run reported no steps")
    missing = [f for f in ("time/step", *FIELDS[mode].values()) if f not in history[0]]
    if missing:
        raise ValueError(f"{mode}: the step records lack {missing} (is r1mega older than this tool?)")
    steady = history[1:] or history
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10,
                        help="GRPO steps per mode (>= 2 for a steady-state mean; a step is ~1 s, start-up ~1-2 min)")
    parser.add_argument("--sft-steps", type=int, default=0, help="cold-start SFT steps before GRPO (both modes)")
    parser.add_argument("--sft-lr", type=float, default=2e-3)
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one, removed)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per mode; all its ranks are killed after")
    parser.add_argument("--rank-spec", help=argparse.SUPPRESS)  # internal: run as one spawned rank
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, applied to both modes")
    args = parser.parse_args(argv)
    if args.rank_spec:
        rank_main(json.loads(args.rank_spec))
        return 0
    if args.steps < 1 or args.sft_steps < 0:
        parser.error("--steps must be >= 1 and --sft-steps >= 0")

    import tempfile

    from r1mega.cli import DEMO_CONFIG
    from r1mega.config import load_config
    from r1mega.platform.spawn import free_port, spawn_ranks

    for mode in MODES:  # config errors here, before anything starts
        load_config(DEMO_CONFIG, mode_overrides(mode, args.overrides), world_size=layout(mode)[0])
    with tempfile.TemporaryDirectory(prefix="r1mega-bench-offpolicy-") as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        from r1mega.data.tasks import task_splits
        from r1mega.train.r1_demo import build_tokenizer

        cfg = load_config(DEMO_CONFIG, args.overrides)
        train, _ = task_splits("addition", 4000, seed=cfg.data.seed, eval_fraction=0.1, digits=2)
        tok_dir = build_tokenizer(root / "tokenizer", train, cfg.model.vocab_size)  # one tokenizer for both modes
        print(f"bench_offpolicy: {args.steps} GRPO steps per mode, sft_steps={args.sft_steps}, "
              f"cpus={os.cpu_count()}, global_batch_size={cfg.trainer.global_batch_size} n={cfg.rollout.n} "
              f"max_new_tokens={cfg.rollout.max_new_tokens}; overrides={args.overrides}", flush=True)
        results = {}
        for mode in MODES:
            world, desc = layout(mode)
            run_dir = root / mode
            spec = {"mode": mode, "root": str(run_dir), "report": str(run_dir / "report.json"),
                    "tokenizer_dir": str(tok_dir), "overrides": mode_overrides(mode, args.overrides),
                    "steps": args.steps, "sft_steps": args.sft_steps, "sft_lr": args.sft_lr}
            run_dir.mkdir(parents=True, exist_ok=True)
            load = os.getloadavg()[0]
            t0 = time.monotonic()
            spawn_ranks([str(Path(__file__).resolve()), "--rank-spec", json.dumps(spec)], world,
                        timeout_s=args.timeout_s, name=f"bench-offpolicy-{mode}", log_dir=run_dir / "logs",
                        env={"R1MEGA_TRANSFER_PORT": str(free_port())})
            report = json.loads((run_dir / "report.json").read_text())
            results[mode] = summarize(mode, report["history"])
            print(f"{format_line(mode, results[mode])} loop_s={report['loop_s']:.1f} "
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
