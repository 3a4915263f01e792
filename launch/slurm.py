"""Generate (and submit) an sbatch script that runs an ``r1mega`` command on N nodes.

    python -m launch.slurm configs/r1_zero_qwen3_30b_a3b.yaml --nodes 4 --partition gpu \
        --account proj --time 04:00:00 [--command train] [--requeue] [--dry-run] [key=value ...]
    python -m launch.slurm configs/r1_tiny_cpu.yaml --nodes 2 --gpus-per-node 0 --procs-per-node 1 \
        parallel.ep=2                                   # CPU nodes: no GPU requested

The recipe plus overrides is validated for ``world_size = nodes * processes per node`` first
(``r1mega.config.load_config``), so a layout that does not fit fails here with the config error,
before any file is written or any job queued. ``--dry-run`` prints the script; otherwise
``--cpus-per-task`` is checked against the partition's nodes (``sinfo``: a job that asks for more CPUs
than a node has would stay pending forever), the script is written to ``--output-dir`` (with the
resolved config next to it, for the record) and submitted with ``sbatch``.

What the script does on the cluster:
- one task per node (``--ntasks-per-node=1``); on each node ``<python> -m torch.distributed.run``
  (``<python>``: the interpreter that generated the script, so no venv needs activating) starts one
  worker per GPU, or ``--procs-per-node`` workers with ``--gpus-per-node 0``, and they meet at a c10d
  rendezvous on the first host of the allocation (``scontrol show hostnames "$SLURM_JOB_NODELIST"``);
- every worker runs ``python -m r1mega.cli <--command> --config <recipe> <overrides>``. ``--command``
  defaults to ``train`` (the GRPO entry); any subcommand of the ``r1mega`` CLI works, e.g. ``demo``.
  A command the installed CLI does not know yet is reported as a warning, not an error;
- Slurm sends ``SIGUSR1`` to the batch shell ``--signal-lead`` seconds (default 120) before the time
  limit. The script's trap signals the job step (``scancel --signal=TERM <job>.0``): every node's
  torchrun gets SIGTERM and forwards it to its workers, which finish the step, checkpoint and exit 75.
  (``kill`` of the ``srun`` process would make srun kill the step at once, with no checkpoint.) With
  ``--requeue`` the job is then requeued (``scontrol requeue``) and resumes from that checkpoint.
  ``scancel`` of the job sends SIGTERM to every process of the step itself, with the same result;
- the job's exit code is 75 when the workers checkpointed and stopped (torchrun reports their 75 as
  1: rank 0 writes ``$R1MEGA_PREEMPTED_FILE``, which the script checks);
- the logs are opened in append mode and every attempt starts with a ``[launch] attempt N`` line, so a
  requeued job's ``.out``/``.err`` keep the earlier attempts.

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
    gpus_per_node: int = 8  # 0: CPU nodes (no GPU requested), procs_per_node workers each
    procs_per_node: Optional[int] = None  # None = one per GPU (1 without GPUs)
    cpus_per_task: Optional[int] = None  # None = 8 per GPU (the whole node's share), else 1 per process
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
    python: str = sys.executable  # the workers' interpreter (the venv that generated the script)

    @property
    def nproc_per_node(self) -> int:
        return self.gpus_per_node or self.procs_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def cpus(self) -> int:
        return self.cpus_per_task or (8 * self.gpus_per_node if self.gpus_per_node else self.nproc_per_node)

    @property
    def per_node(self) -> str:
        if self.gpus_per_node:
            return f"{self.gpus_per_node} GPU(s)"
        return f"{self.nproc_per_node} CPU process(es)"

    @property
    def name(self) -> str:
        return self.job_name or f"r1mega-{Path(self.config).stem}"


def validate(job: SlurmJob):
    """The resolved ``R1Config`` for this world size; raises ``ConfigError`` if the layout cannot run."""
    from r1mega.config import ConfigError, load_config

    if job.nodes < 1 or job.gpus_per_node < 0 or (job.procs_per_node is not None and job.procs_per_node < 1):
        raise ConfigError(f"--nodes ({job.nodes}) and --procs-per-node ({job.procs_per_node}) must be >= 1, "
                          f"--gpus-per-node ({job.gpus_per_node}) >= 0")
    if job.gpus_per_node and job.procs_per_node not in (None, job.gpus_per_node):
        raise ConfigError(f"--procs-per-node {job.procs_per_node} with --gpus-per-node {job.gpus_per_node}: "
                          "GPU nodes run one process per GPU; --procs-per-node is for --gpus-per-node 0 (CPU)")
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


def worker_command(job: SlurmJob) -> list[str]:
    """The command every node's task runs (shell words; ``$SLURM_*``/``$MASTER_*`` expand on the node)."""
    r1mega_args = [job.command, "--config", str(Path(job.config).resolve()), *job.overrides]
    return [
        _q(job.python), "-m torch.distributed.run",
        '--nnodes "$SLURM_NNODES"',
        f"--nproc-per-node {job.nproc_per_node}",
        '--rdzv-id "$SLURM_JOB_ID"',
        "--rdzv-backend c10d",
        '--rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"',
        f"--rdzv-conf join_timeout={job.rdzv_join_timeout_s}",
        "--max-restarts 0",
        "-m r1mega.cli " + " ".join(_q(a) for a in r1mega_args),
    ]


def render_sbatch(job: SlurmJob, cfg=None) -> str:
    """The sbatch script text (``cfg``: the validated config, only used for a comment line)."""
    out = Path(job.output_dir)
    sb = [
        f"--job-name={job.name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        *([f"--gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node else []),
        f"--cpus-per-task={job.cpus}",
        f"--time={job.time}",
    ]
    if job.partition:
        sb.append(f"--partition={job.partition}")
    if job.account:
        sb.append(f"--account={job.account}")
    sb += [f"--output={out / '%x-%j.out'}", f"--error={out / '%x-%j.err'}", "--open-mode=append"]
    if job.exclusive:
        sb.append("--exclusive")
    sb.append("--requeue" if job.requeue else "--no-requeue")
    sb.append(f"--signal=B:USR1@{job.signal_lead_s}")

    srun = ["srun", "--label", "--kill-on-bad-exit=1", '--nodes="$SLURM_NNODES"', "--ntasks-per-node=1"]
    if job.container_image:
        srun.append(f"--container-image={_q(job.container_image)}")
        srun.append(f"--container-mounts={_q(job.container_mounts or job.workdir + ':' + job.workdir)}")
        srun.append(f"--container-workdir={_q(job.workdir)}")
    extra_env = "".join(f"export {k}={_q(v)}\n" for k, _, v in (e.partition("=") for e in job.extra_env))
    if not job.gpus_per_node:  # CPU workers share the task's CPUs
        extra_env = (f'export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-{max(1, job.cpus // job.nproc_per_node)}}}"\n'
                     + extra_env)
    overrides_note = " ".join(job.overrides) or "(none)"
    workers = "WORKERS=(\n  " + " \\\n  ".join(worker_command(job)) + "\n)"
    sbatch_lines = "\n".join("#SBATCH " + line for line in sb)
    marker = out / ".preempted-${SLURM_JOB_ID}"

    return f"""#!/bin/bash
{sbatch_lines}
#
# Generated by `python -m launch.slurm` from {job.config}
# command: r1mega {job.command}; overrides: {overrides_note}
# world size {job.world_size} = {job.nodes} node(s) x {job.per_node}
{_layout_comment(cfg, job.world_size)}
set -uo pipefail
# one line per attempt in both logs (append mode: a requeued job's attempts follow each other)
ATTEMPT="[launch] attempt $(( ${{SLURM_RESTART_COUNT:-0}} + 1 )) (restart count ${{SLURM_RESTART_COUNT:-0}}) of job \
$SLURM_JOB_ID at $(date -Is) on $(hostname)"
echo "$ATTEMPT"; echo "$ATTEMPT" >&2

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
# Slurm sends SIGUSR1 {job.signal_lead_s}s before the time limit (--signal=B:USR1@{job.signal_lead_s}) to this shell;
# the trap sends SIGTERM to the job step: torchrun forwards it to its workers, which finish the step,
# checkpoint and exit 75. (`kill` of srun would make srun kill the step at once, without a checkpoint.)
# scancel of the job sends SIGTERM to every process of the step itself.
# Rank 0 writes R1MEGA_PREEMPTED_FILE when it stopped after a checkpoint: the job then exits 75
# (torchrun reports its workers' 75 as 1).
# torchrun SIGKILLs its workers 30 s after forwarding SIGTERM unless told otherwise (new torch reads this,
# older ones ignore it): give them the whole lead for the step and the save.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-{job.signal_lead_s}}}"
REQUEUE_ON_EXIT={1 if job.requeue else 0}
TIME_LIMIT_HIT=0
export R1MEGA_PREEMPTED_FILE="{marker}"
rm -f "$R1MEGA_PREEMPTED_FILE"
stop_step() {{
  echo "[launch] $(date -Is) got SIG$1; sending SIGTERM to job step $SLURM_JOB_ID.0" >&2
  scancel --signal=TERM "$SLURM_JOB_ID.0" \
    || echo "[launch] job step $SLURM_JOB_ID.0 not signalled: not started yet, or already ending" >&2
}}
trap 'TIME_LIMIT_HIT=1; stop_step USR1' USR1
trap 'stop_step TERM' TERM

{workers}
{" ".join(srun)} "${{WORKERS[@]}}" &
SRUN_PID=$!
# `wait` returns early whenever a trapped signal arrives: keep waiting until srun itself has exited.
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done
wait "$SRUN_PID"
rc=$?
if [ -f "$R1MEGA_PREEMPTED_FILE" ]; then
  echo "[launch] $(date -Is) workers checkpointed and stopped: $(cat "$R1MEGA_PREEMPTED_FILE")" >&2
  rm -f "$R1MEGA_PREEMPTED_FILE"
  rc=75
fi
echo "[launch] $(date -Is) job step exited with $rc" >&2
if [ "$rc" = 75 ] && [ "$TIME_LIMIT_HIT" = 1 ] && [ "$REQUEUE_ON_EXIT" = 1 ]; then
  echo "[launch] $(date -Is) requeueing $SLURM_JOB_ID to resume from the latest checkpoint" >&2
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


def check_partition(job: SlurmJob) -> Optional[str]:
    """Why the partition cannot run this job (``--cpus-per-task`` above its nodes' CPUs), from ``sinfo``;
    ``None`` when it fits or there is no ``sinfo`` to ask (``submit`` then says what is missing)."""
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return None
    proc = subprocess.run([sinfo, "-h", "-N", "-o", "%N|%c|%P"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        print(f"launch.slurm: warning: `sinfo` failed ({proc.stderr.strip()}); --cpus-per-task {job.cpus} was "
              "not checked against the partition's nodes", file=sys.stderr)
        return None
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.count("|") == 2]
    default = next((part.rstrip("*") for _, _, part in rows if part.endswith("*")), None)
    partition = job.partition or default
    nodes = {name: int(cpus) for name, cpus, part in rows if part.rstrip("*") == partition}
    if not nodes:
        known = sorted({part.rstrip("*") for _, _, part in rows})
        return (f"partition {partition!r} has no nodes in `sinfo` (partitions: {', '.join(known) or 'none'}); "
                "choose one with --partition")
    fit = [n for n, c in nodes.items() if c >= job.cpus]
    if len(fit) >= job.nodes:
        return None
    most = max(nodes.values())
    sizes = ", ".join(f"{n}: {c}" for n, c in sorted(nodes.items())[:8]) + (" ..." if len(nodes) > 8 else "")
    return (f"--cpus-per-task {job.cpus} but partition {partition!r} has {len(fit)} node(s) with that many CPUs "
            f"and the job asks for {job.nodes} (CPUs per node: {sizes}); sbatch would accept the job and it "
            f"would stay pending. Use --cpus-per-task {most} or less, or another --partition")


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
    p.add_argument("--gpus-per-node", type=int, default=8, help="0: CPU nodes, no GPU requested")
    p.add_argument("--procs-per-node", type=int, default=None,
                   help="processes per node with --gpus-per-node 0 (default 1); with GPUs one per GPU")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="default: 8 per GPU, or 1 per process on CPU nodes; checked against the partition")
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
    p.add_argument("--python", default=sys.executable,
                   help="the workers' interpreter on the nodes (default: this one, %(default)s)")
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
        procs_per_node=args.procs_per_node, cpus_per_task=args.cpus_per_task, time=args.time,
        partition=args.partition, account=args.account,
        job_name=args.job_name, output_dir=str(Path(args.output_dir).resolve()), command=args.command,
        overrides=list(args.overrides), requeue=args.requeue, signal_lead_s=args.signal_lead,
        master_port=args.master_port, container_image=args.container_image,
        container_mounts=args.container_mounts, extra_env=list(args.env), python=args.python,
    )
    try:
        cfg = validate(job)
    except ConfigError as e:
        print(f"launch.slurm: invalid configuration for {job.nodes} node(s) x {job.per_node} "
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
    problem = check_partition(job)
    if problem:
        print(f"launch.slurm: not submitted: {problem}", file=sys.stderr)
        return 2
    path = write_script(job, text, cfg)
    print(f"launch.slurm: wrote {path}")
    return submit(path)


if __name__ == "__main__":
    sys.exit(main())
