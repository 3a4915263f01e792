"""Run an ``r1mega`` command on this machine under ``torchrun --standalone`` (CPU: gloo), with a timeout.

    python -m launch.local --nproc 2 [--timeout 600] -- demo trainer.steps=2 parallel.ep=2

Everything after ``--`` is passed to ``python -m r1mega.cli`` unchanged. This is the same entry the
Slurm script runs, so a recipe that works here under ``--nproc N`` only changes in scale on a cluster.
The config (``--config`` in the arguments, else the command's default recipe) is validated for
``world_size = nproc`` before anything starts. On timeout the whole process group (torchrun and its
workers) gets SIGTERM, then SIGKILL after a grace period; the exit code is 124.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = {"demo": REPO_ROOT / "configs" / "demo_cpu.yaml"}
TIMEOUT_EXIT = 124


def split_r1mega_args(args: list[str]) -> tuple[str | None, str | None, list[str]]:
    """(command, --config value, key=value overrides) of an r1mega argument list."""
    command = args[0] if args and not args[0].startswith("-") else None
    config, overrides, i = None, [], 1 if command else 0
    while i < len(args):
        a = args[i]
        if a == "--config" and i + 1 < len(args):
            config, i = args[i + 1], i + 2
            continue
        if a.startswith("--config="):
            config = a.split("=", 1)[1]
        elif "=" in a and not a.startswith("-"):
            overrides.append(a)
        i += 1
    return command, config, overrides


def validate(args: list[str], world_size: int):
    """Load and validate the run config the command will use (raises ``ConfigError``)."""
    from r1mega.config import load_config

    command, config, overrides = split_r1mega_args(args)
    if config is None and command in DEFAULT_CONFIGS:
        config = str(DEFAULT_CONFIGS[command])
    return load_config(config, overrides, world_size=world_size)


def torchrun_command(nproc: int, r1mega_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "r1mega.cli", *r1mega_args]


def run_local(nproc: int, r1mega_args: list[str], timeout_s: float = 1800.0, grace_s: float = 10.0) -> int:
    """Run under torchrun in its own process group; stop all of it after ``timeout_s``."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    # Make `-m r1mega.cli` importable from a checkout even without an editable install.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    from r1mega.platform.lifetime import exec_guard

    proc = subprocess.Popen(torchrun_command(nproc, r1mega_args), env=env, cwd=REPO_ROOT,
                            start_new_session=True, preexec_fn=exec_guard())  # ends with this launcher
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"launch.local: {nproc}-process run exceeded {timeout_s:.0f}s; stopping it", file=sys.stderr)
        _stop_group(proc, grace_s)
        return TIMEOUT_EXIT
    except KeyboardInterrupt:
        _stop_group(proc, grace_s)
        raise


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="local processes (default 2)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run is stopped")
    p.add_argument("--no-validate", action="store_true", help="skip the config check before starting")
    p.add_argument("r1mega_args", nargs=argparse.REMAINDER, help="-- <r1mega command and arguments>")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rest = args.r1mega_args[1:] if args.r1mega_args[:1] == ["--"] else args.r1mega_args
    if not rest:
        print("launch.local: nothing to run; usage: python -m launch.local --nproc 2 -- demo ...", file=sys.stderr)
        return 2
    if not args.no_validate:
        from r1mega.config import ConfigError

        try:
            validate(rest, args.nproc)
        except ConfigError as e:
            print(f"launch.local: invalid configuration for {args.nproc} process(es):\n{e}", file=sys.stderr)
            return 2
    return run_local(args.nproc, rest, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
