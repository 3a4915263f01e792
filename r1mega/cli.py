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
from dataclasses import replace
from pathlib import Path

from r1mega.config import ConfigError, load_config
from r1mega.config.paths import check_paths
from r1mega.platform import lifetime

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_cpu.yaml"


def _launched() -> bool:
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))


def _relaunch(nproc: int, argv: list[str], timeout_s: float | None) -> int:
    """Run this command again under torchrun with ``nproc`` local processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "r1mega.cli", *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen(cmd, env=env, preexec_fn=lifetime.exec_guard())  # torchrun ends with this process

    stopped = []

    def forward(signum, frame):  # torchrun passes SIGTERM (SIGUSR1 not on every version) to its workers
        stopped.append(signum)
        proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        rc = proc.wait(timeout=timeout_s)
        if stopped and rc != 0:  # the workers checkpointed and exited 75; torchrun reports that as a failure
            from r1mega.train.resilience import EXIT_PREEMPTED

            print(f"r1mega: stopped by {signal.Signals(stopped[0]).name}; rerun the same command to resume "
                  f"(exit code {EXIT_PREEMPTED})", file=sys.stderr)
            return EXIT_PREEMPTED
        return rc
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        print(f"r1mega: {nproc}-process run exceeded {timeout_s:.0f}s and was stopped", file=sys.stderr)
        return 124
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _checked_config(args, overrides: list[str], training: bool = False, stages=None):
    """The validated config with every path it names checked, in this process before any rank starts
    (a re-launching parent checks it for the ``--nproc`` world it is about to start)."""
    world = args.nproc if args.nproc > 1 and not _launched() else _world_size()
    cfg = load_config(args.config, overrides, world_size=world)
    if getattr(args, "log_level", None) is None:  # --log-level wins over the config's logging.level
        logging.getLogger().setLevel(cfg.logging.level.upper())
    run_stages = stages(cfg) if stages else None
    check_paths(replace(cfg, stages=run_stages) if run_stages else cfg, training=training)
    return cfg


def _demo_overrides(nproc: int, overrides: list[str]) -> list[str]:
    """A 2-process demo defaults to expert parallelism, unless the user chose a layout."""
    if nproc > 1 and not any(o.startswith(("parallel.tp=", "parallel.pp=", "parallel.ep=")) for o in overrides):
        return [f"parallel.ep={nproc}", *overrides]
    return overrides


def cmd_demo(args, rest: list[str]) -> int:
    """The R1 demo: ``r1mega train`` on configs/demo_cpu.yaml (eval -> cold-start SFT -> eval -> GRPO -> eval)."""
    args.command, args.overrides = "train", _demo_overrides(args.nproc, args.overrides)
    return cmd_train(args, rest)


def cmd_train(args, rest: list[str]) -> int:
    """Run the recipe's stages in order (``r1mega.train.recipe``); ``sft`` runs one SFT stage; ``distill`` runs
    the recipe's stages (which must include a distill stage), or one distill stage when it has none."""
    from r1mega.config import StageConfig

    def stages(cfg):  # what `sft` / a stage-less `distill` run instead of the recipe's stages
        if args.command == "sft":
            return [StageConfig(name="sft", kind="sft")]
        return [StageConfig(name="distill", kind="distill")] if args.command == "distill" and not cfg.stages else None

    cfg = _checked_config(args, args.overrides, training=True, stages=stages)
    if args.nproc > 1 and not _launched():
        return _relaunch(args.nproc, [args.command, "--config", str(args.config), *args.overrides], args.timeout)
    from r1mega.data.jsonl import DataError
    from r1mega.train.recipe import run_recipe
    from r1mega.train.resilience import EXIT_PREEMPTED, TrainingPreempted
    from r1mega.train.teacher_gen import GenerationPaused

    only = stages(cfg)
    if args.command == "distill":
        if cfg.stages and not any(st.kind == "distill" for st in cfg.stages):
            raise ConfigError("`r1mega distill` needs a stage with kind: distill in `stages:` (or no stages at all "
                              "for a single distill stage); use `r1mega train` for other recipes")
        if only:  # the single stage must pass the distill checks too
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
    except TrainingPreempted as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"r1mega {args.command}: {e} (exit code {EXIT_PREEMPTED})", file=sys.stderr)
            if os.environ.get("R1MEGA_PREEMPTED_FILE"):  # launch/slurm.py's script: torchrun turns our 75 into 1
                Path(os.environ["R1MEGA_PREEMPTED_FILE"]).write_text(f"{e}\n")
        return EXIT_PREEMPTED
    if s is None:  # an engine rank of a one-step-off run
        return 0
    if int(os.environ.get("RANK", 0)) == 0:
        evals = ""
        if s.get("evals"):
            evals = "; eval pass@1 " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in s["evals"].items())
        print(f"{args.command}: stages {', '.join(f'{k} ({v} steps)' for k, v in s['steps'].items()) or '-'} in "
              f"{s['seconds']:.1f}s{evals}; final checkpoint {s['final_checkpoint']}; summary in "
              f"{cfg.trainer.output_dir}/summary.json, curves in {s.get('plot')}")
    return 0


def cmd_eval(args, rest: list[str]) -> int:
    """pass@1 (mean over k samples), cons@k, format rate and response length -> a JSON report
    (several benchmarks: plus a markdown table, printed)."""
    cfg = _checked_config(args, args.overrides)
    if args.nproc > 1 and not _launched():
        argv = ["eval", "--config", str(args.config),
                *_flags(args, ("data", "benchmarks", "k", "checkpoint", "hf", "out")), *args.overrides]
        return _relaunch(args.nproc, argv, args.timeout)
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
            result = from_hf(args.hf, args.out, tp=args.tp, pp=args.pp, ep=args.ep, pp_first=args.pp_first,
                             pp_last=args.pp_last, force=args.force, precision=args.precision,
                             mtp_layers=args.mtp_layers)
    except (ConvertError, BridgeError, HFFormatError, SafetensorsError, FileNotFoundError) as e:
        print(f"r1mega convert: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"convert {args.direction}: {result}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1mega", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, ... (default: the config's logging.level)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="R1 recipe in miniature: cold-start SFT -> GRPO on addition (CPU, minutes); "
                                       "`r1mega train` on configs/demo_cpu.yaml")
    demo.add_argument("--config", default=str(DEMO_CONFIG), help="recipe YAML (default: configs/demo_cpu.yaml)")
    demo.add_argument("--nproc", type=int, default=1, help="local processes (2: expert parallel by default)")
    demo.add_argument("--timeout", type=float, default=1800.0, help="seconds before a multi-process run is stopped")
    demo.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.grpo.steps=20 parallel.tp=2")
    demo.set_defaults(func=cmd_demo)

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
    from_hf.add_argument("--pp-first", type=int, default=None, help="layers on the first pipeline stage (uneven)")
    from_hf.add_argument("--pp-last", type=int, default=None, help="layers on the last pipeline stage (uneven)")
    for p in (to_hf, from_hf):
        p.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    convert.set_defaults(func=cmd_convert)
    return parser


def _bind_lifetime() -> None:
    """A torchrun worker ends with its agent; what libraries fork from this process ends with it. (A command
    run from a shell is not tied to the shell: ``nohup r1mega train`` outlives it.)"""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        lifetime.die_with_parent()
    lifetime.forked_children_die_with_this_process()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "check-parallel":
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    logging.basicConfig(level=(args.log_level or "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _bind_lifetime()
    try:
        return args.func(args, rest)
    except ConfigError as e:
        print(f"r1mega {args.command}: {e}", file=sys.stderr)  # e says "invalid configuration: ..."
        return 2


def run() -> None:
    """The ``r1mega`` command: :func:`main`, then the process ends as Python would end it, less the teardown
    of every module (torch, megatron, transformers: about 1 s on 2 cores, after the run's work is all done).
    Non-daemon threads are joined and the exit hooks run (multiprocessing's joins and finalizers, the
    checkpoint writer's Manager, logging's flush) before ``lifetime.exit_now``. An exception takes the normal
    exit."""
    import atexit
    import threading

    rc = main()
    run_exit_hooks = getattr(atexit, "_run_exitfuncs", None)  # CPython's own, as its exit calls it
    if run_exit_hooks is None or not (rc is None or isinstance(rc, int)):
        sys.exit(rc)
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    run_exit_hooks()
    lifetime.exit_now(rc or 0)


if __name__ == "__main__":
    run()
