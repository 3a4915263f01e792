"""``r1mega`` command line: ``r1mega <command> [--config FILE] [key=value ...]``.

Every command runs the same way on one process, under ``torchrun`` or under Slurm ``srun``: it reads
its rank from the environment. ``--nproc N`` on a single machine re-launches the command under
``torchrun --standalone --nproc-per-node N`` (CPU: gloo).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from r1mega.config import ConfigError, load_config

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_cpu.yaml"
LM_DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "lm_demo_cpu.yaml"


def _launched() -> bool:
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))


def _relaunch(nproc: int, argv: list[str], timeout_s: float | None) -> int:
    """Run this command again under torchrun with ``nproc`` local processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "r1mega.cli", *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, frame):  # torchrun passes SIGTERM (SIGUSR1 not on every version) to its workers
        proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        print(f"r1mega: {nproc}-process run exceeded {timeout_s:.0f}s and was stopped", file=sys.stderr)
        return 124
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _demo_overrides(nproc: int, overrides: list[str]) -> list[str]:
    """A 2-process demo defaults to expert parallelism, unless the user chose a layout."""
    if nproc > 1 and not any(o.startswith(("parallel.tp=", "parallel.pp=", "parallel.ep=")) for o in overrides):
        return [f"parallel.ep={nproc}", *overrides]
    return overrides


def cmd_demo(args, rest: list[str]) -> int:
    """The R1 demo: eval -> cold-start SFT -> eval -> GRPO -> eval (``r1mega.train.r1_demo``)."""
    overrides = _demo_overrides(args.nproc, args.overrides)
    if args.nproc > 1 and not _launched():
        argv = ["demo", "--config", str(args.config), "--sft-steps", str(args.sft_steps), "--sft-lr", str(args.sft_lr),
                "--eval-prompts",
                str(args.eval_prompts), "--eval-k", str(args.eval_k), *overrides]
        return _relaunch(args.nproc, argv, args.timeout)
    cfg = load_config(args.config, overrides, world_size=_world_size())
    from r1mega.train.r1_demo import run_r1_demo
    from r1mega.train.resilience import EXIT_PREEMPTED, TrainingPreempted

    try:
        s = run_r1_demo(cfg, sft_steps=args.sft_steps, sft_lr=args.sft_lr, eval_prompts=args.eval_prompts,
                        eval_k=args.eval_k)
    except TrainingPreempted as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"r1mega demo: {e} (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
    if int(os.environ.get("RANK", 0)) == 0:
        print(
            f"demo: {s['world_size']} process(es), {s['seconds']:.1f}s ({s['sft_steps']} SFT + {s['grpo_steps']} "
            f"GRPO steps); eval pass@1 (mean of {s['eval_k']} samples x {s['eval_prompts']} held-out prompts): "
            f"before SFT {s['eval/pass@1_before_sft']:.3f}, after SFT {s['eval/pass@1_after_sft']:.3f}, "
            f"after GRPO {s['eval/pass@1_after_grpo']:.3f}; GRPO train reward first 20% "
            f"{s['grpo/reward_first_20pct']:.3f} -> last 20% {s['grpo/reward_last_20pct']:.3f}; "
            f"summary in {cfg.trainer.output_dir}/summary.json"
        )
    return 0


def cmd_lm_demo(args, rest: list[str]) -> int:
    overrides = _demo_overrides(args.nproc, args.overrides)
    if args.nproc > 1 and not _launched():
        argv = ["lm-demo", "--config", str(args.config), *overrides]
        return _relaunch(args.nproc, argv, args.timeout)
    cfg = load_config(args.config, overrides, world_size=_world_size())
    from r1mega.train.lm_demo import run_lm_demo

    summary = run_lm_demo(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(
            f"lm-demo: {summary['world_size']} process(es), {cfg.trainer.steps} steps in {summary['seconds']:.1f}s; "
            f"held-out answer loss {summary['eval/answer_loss_before']:.3f} -> "
            f"{summary['eval/answer_loss_after']:.3f}; metrics in {cfg.trainer.output_dir}"
        )
    return 0


def cmd_train(args, rest: list[str]) -> int:
    """Run the recipe's stages in order (``r1mega.train.recipe``); ``sft`` runs one SFT stage; ``distill`` runs
    the recipe's stages (which must include a distill stage), or one distill stage when it has none."""
    if args.nproc > 1 and not _launched():
        return _relaunch(args.nproc, [args.command, "--config", str(args.config), *args.overrides], args.timeout)
    cfg = load_config(args.config, args.overrides, world_size=_world_size())
    from r1mega.config import StageConfig
    from r1mega.data.jsonl import DataError
    from r1mega.train.recipe import run_recipe
    from r1mega.train.teacher_gen import GenerationPaused

    only = [StageConfig(name="sft", kind="sft")] if args.command == "sft" else None
    if args.command == "distill":
        if cfg.stages and not any(st.kind == "distill" for st in cfg.stages):
            raise ConfigError("`r1mega distill` needs a stage with kind: distill in `stages:` (or no stages at all "
                              "for a single distill stage); use `r1mega train` for other recipes")
        only = None if cfg.stages else [StageConfig(name="distill", kind="distill")]
        if only:  # the single stage must pass the distill checks too
            from dataclasses import replace

            from r1mega.config import validate_config

            validate_config(replace(cfg, stages=only), _world_size())
    try:
        s = run_recipe(cfg, only)
    except DataError as e:
        print(f"r1mega {args.command}: {e}", file=sys.stderr)
        return 2
    except GenerationPaused as e:
        print(f"r1mega {args.command}: {e}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", 0)) == 0:
        evals = ""
        if "eval/pass@1_first" in s:
            evals = f"; eval pass@1 {s['eval/pass@1_first']:.3f} -> {s['eval/pass@1_last']:.3f}"
        print(f"{args.command}: stages {', '.join(f'{k} ({v} steps)' for k, v in s['steps'].items()) or '-'} in "
              f"{s['seconds']:.1f}s{evals}; final checkpoint {s['final_checkpoint']}; summary in "
              f"{cfg.trainer.output_dir}/summary.json, curves in {s.get('plot')}")
    return 0


def cmd_eval(args, rest: list[str]) -> int:
    """pass@1 (mean over k samples), cons@k, format rate and response length -> a JSON report
    (several benchmarks: plus a markdown table, printed)."""
    if args.nproc > 1 and not _launched():
        argv = ["eval", "--config", str(args.config),
                *_flags(args, ("data", "benchmarks", "k", "checkpoint", "hf", "out")), *args.overrides]
        return _relaunch(args.nproc, argv, args.timeout)
    cfg = load_config(args.config, args.overrides, world_size=_world_size())
    from r1mega.data.jsonl import DataError
    from r1mega.train.eval_run import EvalRequest, run_eval

    try:
        report = run_eval(cfg, EvalRequest(args.data, args.k, args.checkpoint, args.hf, args.out, args.benchmarks))
    except DataError as e:
        print(f"r1mega eval: {e}", file=sys.stderr)
        return 2
    if report is not None and "benchmarks" in report:
        print(report["table"] + f"\neval: {len(report['benchmarks'])} benchmarks; report in {report['report']}, "
              f"table in {report['markdown']}")
    elif report is not None:
        cons = f", cons@{report['k']} {report['eval/cons@k']:.3f}" if "eval/cons@k" in report else ""
        print(f"eval: {report['problems']} problems x {report['k']} samples: pass@1 {report['eval/pass@1']:.3f}"
              f"{cons}, format {report['eval/format']:.3f}, response length {report['eval/response_len']:.1f} "
              f"tokens; report in {report['report']}")
    return 0


def _flags(args, names: tuple[str, ...]) -> list[str]:
    """``--name value`` for each option that was given (to re-launch a command under torchrun)."""
    out: list[str] = []
    for name in names:
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name}", str(value)]
    return out


def cmd_check_parallel(args, rest: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from check_parallel import main as check_main

    return check_main(rest)


def cmd_convert(args, rest: list[str]) -> int:
    """``convert to-hf`` / ``convert from-hf`` (one process, or the layout's world under torchrun)."""
    from r1mega.bridge.convert import ConvertError, from_hf, to_hf
    from r1mega.bridge.hf_source import HFFormatError
    from r1mega.bridge.rules import BridgeError
    from r1mega.bridge.safetensors_io import SafetensorsError

    try:
        if args.direction == "to-hf":
            result = to_hf(args.ckpt, args.out, tokenizer=args.tokenizer, force=args.force,
                           bucket_mb=args.bucket_mb, dtype=args.dtype, fp8=args.fp8, progress=not args.no_progress)
        else:
            result = from_hf(args.hf, args.out, tp=args.tp, pp=args.pp, ep=args.ep, force=args.force,
                             precision=args.precision, mtp_layers=args.mtp_layers)
    except (ConvertError, BridgeError, HFFormatError, SafetensorsError, FileNotFoundError) as e:
        print(f"r1mega convert: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"convert {args.direction}: {result}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1mega", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="R1 recipe in miniature: cold-start SFT -> GRPO on addition (CPU, minutes)")
    demo.add_argument("--config", default=str(DEMO_CONFIG), help="recipe YAML (default: configs/demo_cpu.yaml)")
    demo.add_argument("--sft-steps", type=int, default=150, help="cold-start SFT steps (trainer.steps: GRPO steps)")
    demo.add_argument("--sft-lr", type=float, default=2e-3, help="cold-start SFT learning rate (optimizer.lr: GRPO)")
    demo.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts per eval")
    demo.add_argument("--eval-k", type=int, default=4, help="samples per prompt for pass@1")
    lm_demo = sub.add_parser("lm-demo", help="train the tiny MoE policy on addition answers (supervised, CPU)")
    lm_demo.add_argument("--config", default=str(LM_DEMO_CONFIG),
                         help="recipe YAML (default: configs/lm_demo_cpu.yaml)")
    for p in (demo, lm_demo):
        p.add_argument("--nproc", type=int, default=1, help="local processes (2: expert parallel by default)")
        p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a multi-process run is stopped")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.steps=50 parallel.tp=2")
    demo.set_defaults(func=cmd_demo)
    lm_demo.set_defaults(func=cmd_lm_demo)

    train = sub.add_parser("train", help="run a recipe's stages in order (sft / grpo / rejection_sampling / distill)")
    sft = sub.add_parser("sft", help="one SFT stage on data.train_path for trainer.steps (ignores `stages`)")
    distill = sub.add_parser("distill", help="teacher generations -> rejection filter -> student SFT (resumable; "
                                             "the `distill:` section names the teacher)")
    for p in (train, sft, distill):
        p.add_argument("--config", required=True, help="recipe YAML, e.g. configs/r1_tiny_cpu.yaml")
        p.add_argument("--nproc", type=int, default=1, help="local processes (torchrun --standalone)")
        p.add_argument("--timeout", type=float, default=86400.0, help="seconds before a multi-process run is stopped")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.steps=50 parallel.ep=2")
        p.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="pass@1 over k samples, cons@k, format, response length on a JSONL set "
                                     "or on benchmarks (MATH-500/AIME, GPQA, code)")
    ev.add_argument("--config", required=True, help="recipe YAML (model, rollout sampling, eval section)")
    ev.add_argument("--data", default=None, help="JSONL with prompt/messages + answer (or synthetic:<task>); "
                                                 "default data.eval_path")
    ev.add_argument("--benchmarks", default=None,
                    help="name=path[:kind],... local benchmark files (kind: math | choice | code, default: "
                         "detected from the fields), one report + markdown table; default eval.benchmarks")
    ev.add_argument("--k", type=int, default=None, help="samples per problem (default eval.k)")
    model = ev.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", default=None, help="r1mega checkpoint root or step_* dir "
                                                          "(default checkpoint.load_dir)")
    model.add_argument("--hf", default=None, help="Hugging Face model directory (config.json + safetensors)")
    ev.add_argument("--out", default=None, help="report path (default <trainer.output_dir>/eval.json)")
    ev.add_argument("--nproc", type=int, default=1, help="local processes for loading a checkpoint's layout")
    ev.add_argument("--timeout", type=float, default=1800.0, help="seconds before a multi-process run is stopped")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.k=8 eval.temperature=0.6")
    ev.set_defaults(func=cmd_eval)

    check = sub.add_parser("check-parallel", help="parallel-layout parity check (see tools/check_parallel.py)",
                           add_help=False)
    check.set_defaults(func=cmd_check_parallel)

    convert = sub.add_parser("convert", help="convert checkpoints to / from Hugging Face format")
    conv = convert.add_subparsers(dest="direction", required=True)
    to_hf = conv.add_parser("to-hf", help="r1mega dist checkpoint of any layout -> HF directory (safetensors), "
                                          "on one process")
    to_hf.add_argument("--ckpt", required=True, help="checkpoint root (follows latest) or step_* directory")
    to_hf.add_argument("--out", required=True, help="HF output directory (must be empty unless --force)")
    to_hf.add_argument("--tokenizer", default=None, help="directory with tokenizer files to copy")
    to_hf.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="cast weights on export (default: training dtype)")
    to_hf.add_argument("--fp8", action="store_true", help="FP8 linear weights with 128x128 block scales")
    to_hf.add_argument("--bucket-mb", type=float, default=256.0, help="export bucket size (bounds memory)")
    to_hf.add_argument("--no-progress", action="store_true")
    from_hf = conv.add_parser("from-hf", help="HF directory (FP8 dequantised) -> weights-only r1mega dist checkpoint")
    from_hf.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    from_hf.add_argument("--out", required=True, help="checkpoint root to write (must be empty unless --force)")
    from_hf.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                         help="model precision (default: bf16 for bfloat16 / FP8 sources, else fp32)")
    from_hf.add_argument("--mtp-layers", type=int, default=None,
                         help="multi-token-prediction layers to convert into the model (default: config.json's "
                              "num_nextn_predict_layers); the rest are kept unchanged for to-hf")
    for flag in ("--tp", "--pp", "--ep"):
        from_hf.add_argument(flag, type=int, default=1, help="layout of the written shards (torchrun with "
                                                              "tp*pp*dp processes); any layout loads it")
    for p in (to_hf, from_hf):
        p.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    convert.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "check-parallel":
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args, rest)
    except ConfigError as e:
        print(f"r1mega: invalid configuration:\n{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
