"""Generate (and submit) an sbatch script that runs an ``r1mega`` command on N nodes.

    python -m launch.slurm configs/r1_zero_qwen3_30b_a3b.yaml --nodes 4 --partition gpu \
        --account proj --time 04:00:00 [--command train] [--requeue] [--dry-run] [key=value ...]

The recipe plus overrides is validated for ``world_size = nodes * gpus_per_node`` first
(``r1mega.config.load_config``), so a layout that does not fit fails here with the config error,
before any file is written or any job queued. ``--dry-run`` prints the script; otherwise it is written
to ``--output-dir`` (with the resolved config next to it, for the record) and submitted with ``sbatch``.

What the script does on the cluster:
- one task per node (``--ntasks-per-node=1``); on each node ``torchrun`` starts ``--gpus-per-node``
  workers and they meet at a c10d rendezvous on the first host of the allocation
  (``scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1``);
- every worker runs ``python -m r1mega.cli <--command> --config <recipe> <overrides>``. ``--command``
  defaults to ``train`` (the GRPO entry); any subcommand of the ``r1mega`` CLI works, e.g. ``demo``.
  A command the installed CLI does not know yet is reported as a warning, not an error;
- Slurm sends ``SIGUSR1`` to the batch shell ``--signal-lead`` seconds (default 120) before the time
  limit. The script's trap forwards it to the job step as ``SIGTERM`` (torchrun forwards SIGTERM to
  its workers on every torch version; SIGUSR1 only with ``--signals-to-handle`` in new ones), so r1mega
  checkpoints and exits; with ``--requeue`` the job is then requeued (``scontrol requeue``) and resumes
  from the latest checkpoint. A ``SIGTERM`` to the batch shell (``scancel``) is forwarded the same way.

``--local --nproc N`` runs the same command on this machine instead (see ``launch.local``).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class SlurmJob:
    """Everything the sbatch script depends on."""

    config: str
    nodes: int
    gpus_per_node: int = 8
    cpus_per_task: Optional[int] = None  # None = 8 per GPU (the whole node's share for one task)
    time: str = "04:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    job_name: Optional[str] = None  # None = r1mega-<recipe stem>
    output_dir: str = "runs/slurm"
    command: str = "train"
    overrides: list[str] = field(default_factory=list)
    requeue: bool = False
    exclusive: bool = True
    signal_lead_s: int = 120
    master_port: int = 29500
    rdzv_join_timeout_s: int = 900
    container_image: Optional[str] = None
    container_mounts: Optional[str] = None
    workdir: str = str(REPO_ROOT)
    extra_env: list[str] = field(default_factory=list)  # KEY=VALUE, exported before srun

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def name(self) -> str:
        return self.job_name or f"r1mega-{Path(self.config).stem}"


def validate(job: SlurmJob):
    """The resolved ``R1Config`` for this world size; raises ``ConfigError`` if the layout cannot run."""
    from r1mega.config import load_config

    if job.nodes < 1 or job.gpus_per_node < 1:
        from r1mega.config import ConfigError

        raise ConfigError(f"--nodes ({job.nodes}) and --gpus-per-node ({job.gpus_per_node}) must be >= 1")
    return load_config(job.config, job.overrides, world_size=job.world_size)


def known_commands() -> set[str]:
    """Subcommands of the installed ``r1mega`` CLI."""
    from r1mega.cli import build_parser

    parser = build_parser()
    for action in parser._actions:  # argparse has no public accessor for subparsers
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def _q(value) -> str:
    return shlex.quote(str(value))


def _layout_comment(cfg, world_size: int) -> str:
    if cfg is None:
        return ""
    from r1mega.config import derived_dp

    p = cfg.parallel
    return (f"# layout: tp={p.tp} pp={p.pp} ep={p.ep} etp={p.etp} dp={derived_dp(p, world_size)}; "
            f"model {cfg.model.preset}/{cfg.model.size} ({cfg.model.precision})\n")


def render_sbatch(job: SlurmJob, cfg=None) -> str:
    """The sbatch script text (``cfg``: the validated config, only used for a comment line)."""
    out = Path(job.output_dir)
    cpus = job.cpus_per_task or 8 * job.gpus_per_node
    sb = [
        f"--job-name={job.name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={job.gpus_per_node}",
        f"--cpus-per-task={cpus}",
        f"--time={job.time}",
    ]
    if job.partition:
        sb.append(f"--partition={job.partition}")
    if job.account:
        sb.append(f"--account={job.account}")
    sb += [f"--output={out / '%x-%j.out'}", f"--error={out / '%x-%j.err'}"]
    if job.exclusive:
        sb.append("--exclusive")
    sb.append("--requeue" if job.requeue else "--no-requeue")
    sb.append(f"--signal=B:USR1@{job.signal_lead_s}")

    r1mega_args = [job.command, "--config", str(Path(job.config).resolve()), *job.overrides]
    torchrun = [
        "torchrun",
        '--nnodes "$SLURM_NNODES"',
        f"--nproc-per-node {job.gpus_per_node}",
        '--rdzv-id "$SLURM_JOB_ID"',
        "--rdzv-backend c10d",
        '--rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"',
        f"--rdzv-conf join_timeout={job.rdzv_join_timeout_s}",
        "--max-restarts 0",
        "-m r1mega.cli " + " ".join(_q(a) for a in r1mega_args),
    ]
    srun = ["srun", "--label", "--kill-on-bad-exit=1", '--nodes="$SLURM_NNODES"', "--ntasks-per-node=1"]
    if job.container_image:
        srun.append(f"--container-image={_q(job.container_image)}")
        srun.append(f"--container-mounts={_q(job.container_mounts or job.workdir + ':' + job.workdir)}")
        srun.append(f"--container-workdir={_q(job.workdir)}")
    extra_env = "".join(f"export {k}={_q(v)}\n" for k, _, v in (e.partition("=") for e in job.extra_env))
    overrides_note = " ".join(job.overrides) or "(none)"
    launch_cmd = " ".join(srun) + " \\\n  " + " \\\n    ".join(torchrun)
    sbatch_lines = "\n".join("#SBATCH " + line for line in sb)

    return f"""#!/bin/bash
{sbatch_lines}
#
# Generated by `python -m launch.slurm` from {job.config}
# command: r1mega {job.command}; overrides: {overrides_note}
# world size {job.world_size} = {job.nodes} node(s) x {job.gpus_per_node} GPU(s)
{_layout_comment(cfg, job.world_size)}
set -uo pipefail

# ---------------------------------------------------------------- multi-node NCCL / torch environment
# Fabric selection: leave unset for NCCL's auto-detection, or set for your cluster:
#   NCCL_SOCKET_IFNAME  NIC for bootstrap/socket traffic, e.g. ib0, eth0 or ^lo,docker0
#   NCCL_IB_HCA         InfiniBand/RoCE adapters, e.g. mlx5 or mlx5_0,mlx5_1
#   NCCL_IB_DISABLE=1   TCP sockets only (clusters without IB/RoCE; much slower)
# export NCCL_SOCKET_IFNAME=ib0
# export NCCL_IB_HCA=mlx5
export NCCL_DEBUG="${{NCCL_DEBUG:-WARN}}"
# A failed or timed-out collective aborts the process instead of hanging the job (old and new names).
export NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# Watchdog: a rank whose collectives stop progressing for this long is torn down.
export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC="${{TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-900}}"
export NCCL_IB_TIMEOUT="${{NCCL_IB_TIMEOUT:-22}}"
# The collective timeout itself is parallel.timeout_minutes of the recipe (process-group init).
# megatron: TP/SP communication overlap relies on kernels being issued in order on one queue.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTHONUNBUFFERED=1
{extra_env}
# ---------------------------------------------------------------- rendezvous on the first node
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
MASTER_PORT="${{MASTER_PORT:-{job.master_port}}}"
export MASTER_ADDR MASTER_PORT
echo "[launch] job $SLURM_JOB_ID: $SLURM_NNODES node(s), rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
cd {_q(job.workdir)}

# ---------------------------------------------------------------- signals: checkpoint, then exit/requeue
# Slurm sends SIGUSR1 {job.signal_lead_s}s before the time limit (--signal=B:USR1@{job.signal_lead_s});
# scancel sends SIGTERM.
# Both reach the job step as SIGTERM (torchrun forwards it to every worker), and r1mega checkpoints and exits.
REQUEUE_ON_EXIT={1 if job.requeue else 0}
SRUN_PID=""
TIME_LIMIT_HIT=0
forward_to_step() {{
  echo "[launch] $(date -Is) got SIG$1; forwarding SIGTERM to the job step (pid ${{SRUN_PID:-none}})" >&2
  if [ -n "$SRUN_PID" ]; then kill -TERM "$SRUN_PID" 2>/dev/null || true; fi
}}
trap 'TIME_LIMIT_HIT=1; forward_to_step USR1' USR1
trap 'forward_to_step TERM' TERM

{launch_cmd} &
SRUN_PID=$!
# `wait` returns early whenever a trapped signal arrives: keep waiting until srun itself has exited.
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done
wait "$SRUN_PID"
rc=$?
echo "[launch] $(date -Is) job step exited with $rc" >&2
if [ "$TIME_LIMIT_HIT" = 1 ] && [ "$REQUEUE_ON_EXIT" = 1 ]; then
  echo "[launch] requeueing $SLURM_JOB_ID to resume from the latest checkpoint" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit $rc
"""


def write_script(job: SlurmJob, text: str, cfg=None) -> Path:
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{job.name}.sbatch"
    path.write_text(text)
    path.chmod(0o755)
    if cfg is not None:
        from r1mega.config import save_config

        save_config(cfg, out / f"{job.name}.resolved.yaml")
    return path


def submit(path: Path) -> int:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        print(f"launch.slurm: `sbatch` was not found on PATH, so {path} was written but not submitted. "
              "Run this on a Slurm login node, or submit it there with `sbatch " f"{path}`; "
              "use --dry-run to only print the script.", file=sys.stderr)
        return 127
    proc = subprocess.run([sbatch, str(path)])
    return proc.returncode


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="recipe YAML, e.g. configs/r1_zero_qwen3_30b_a3b.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=1e-6 parallel.tp=4")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpus-per-task", type=int, default=None, help="default: 8 per GPU")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", default="04:00:00", help="time limit, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--job-name")
    p.add_argument("--output-dir", default="runs/slurm", help="where the script and the job logs go")
    p.add_argument("--command", default="train",
                   help="r1mega subcommand each worker runs (default: train; e.g. demo)")
    p.add_argument("--requeue", action="store_true",
                   help="requeue after the pre-time-limit checkpoint (and on node failure)")
    p.add_argument("--signal-lead", type=int, default=120, help="seconds before the limit to send SIGUSR1")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--container-image", help="run inside this image (pyxis/enroot srun --container-image)")
    p.add_argument("--container-mounts", help="default: the repository, at the same path")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment exported in the script (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    p.add_argument("--local", action="store_true", help="run the command here under torchrun --standalone")
    p.add_argument("--nproc", type=int, default=2, help="--local: processes on this machine")
    p.add_argument("--timeout", type=float, default=1800.0, help="--local: seconds before the run is stopped")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from r1mega.config import ConfigError

    if args.local:
        from launch import local

        r1mega_args = [args.command, "--config", args.config, *args.overrides]
        try:
            local.validate(r1mega_args, args.nproc)
        except ConfigError as e:
            print(f"launch.slurm: invalid configuration for {args.nproc} local process(es):\n{e}",
                  file=sys.stderr)
            return 2
        return local.run_local(args.nproc, r1mega_args, args.timeout)

    for e in args.env:
        if "=" not in e:
            print(f"launch.slurm: --env {e!r} is not KEY=VALUE", file=sys.stderr)
            return 2
    job = SlurmJob(
        config=args.config, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition, account=args.account,
        job_name=args.job_name, output_dir=str(Path(args.output_dir).resolve()), command=args.command,
        overrides=list(args.overrides), requeue=args.requeue, signal_lead_s=args.signal_lead,
        master_port=args.master_port, container_image=args.container_image,
        container_mounts=args.container_mounts, extra_env=list(args.env),
    )
    try:
        cfg = validate(job)
    except ConfigError as e:
        print(f"launch.slurm: invalid configuration for {job.nodes} node(s) x {job.gpus_per_node} GPU(s) "
              f"= world size {job.world_size}:\n{e}", file=sys.stderr)
        return 2
    if job.command not in known_commands():
        print(f"launch.slurm: warning: the installed r1mega CLI has no `{job.command}` command yet "
              f"(it has: {', '.join(sorted(known_commands()))}); the job will fail at start until it does.",
              file=sys.stderr)
    text = render_sbatch(job, cfg)
    if args.dry_run:
        sys.stdout.write(text)
        return 0
    path = write_script(job, text, cfg)
    print(f"launch.slurm: wrote {path}")
    return submit(path)


if __name__ == "__main__":
    sys.exit(main())
