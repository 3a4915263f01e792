"""launch/: sbatch generation (1 and 64 nodes), the signal trap, hostlists, fail-fast validation, local mode."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `launch` is a top-level directory next to r1mega/, not an installed package
    sys.path.insert(0, str(REPO))
SFT_ONLY = ["--config", str(REPO / "configs" / "r1_tiny_cpu.yaml"), "data.eval_path=null",
            "trainer.global_batch_size=8", "parallel.micro_batch_size=4"]

from launch import local, slurm  # noqa: E402
from launch.nodelist import NodelistError, expand_nodelist, first_host  # noqa: E402

QWEN = str(REPO / "configs" / "r1_zero_qwen3_30b_a3b.yaml")
DSV3 = str(REPO / "configs" / "r1_deepseek_v3_671b.yaml")
TINY = str(REPO / "configs" / "r1_tiny_cpu.yaml")


def _generate(tmp_path, *args: str, env_path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if env_path is not None:
        env["PATH"] = env_path
    return subprocess.run([sys.executable, "-m", "launch.slurm", *args, "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)


def _bash_syntax_ok(path: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ nodelist


@pytest.mark.parametrize("expr,hosts", [
    ("gpu-[01-03,07],login1", ["gpu-01", "gpu-02", "gpu-03", "gpu-07", "login1"]),
    ("node1", ["node1"]),
    ("a,b,c", ["a", "b", "c"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("dgx-[5],cpu[1-2]-ib", ["dgx-5", "cpu1-ib", "cpu2-ib"]),
])
def test_expand_nodelist(expr, hosts):
    assert expand_nodelist(expr) == hosts
    assert first_host(expr) == hosts[0]


@pytest.mark.parametrize("bad", ["", "gpu-[01-03", "gpu-01]", "gpu-[3-1]", "gpu-[a-b]", "gpu-[1-]", "x[[1]]"])
def test_bad_nodelists_are_rejected(bad):
    with pytest.raises(NodelistError):
        expand_nodelist(bad)


# ------------------------------------------------------------------ sbatch generation


def test_one_node_script(tmp_path):
    job = slurm.SlurmJob(config=QWEN, nodes=1, overrides=["parallel.ep=4", "optimizer.lr=2e-6"],
                         partition="gpu", account="proj", time="00:30:00", output_dir=str(tmp_path))
    cfg = slurm.validate(job)
    text = slurm.render_sbatch(job, cfg)
    for line in ["#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=64", "#SBATCH --time=00:30:00", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", f"#SBATCH --output={tmp_path}/%x-%j.out",
                 f"#SBATCH --error={tmp_path}/%x-%j.err", "#SBATCH --signal=B:USR1@120", "#SBATCH --no-requeue",
                 "export NCCL_ASYNC_ERROR_HANDLING=1", "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                 "export CUDA_DEVICE_MAX_CONNECTIONS=1", "# export NCCL_SOCKET_IFNAME=",
                 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"',
                 "--rdzv-backend c10d", '--rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"', "--nproc-per-node 8",
                 '--nnodes "$SLURM_NNODES"', "trap 'TIME_LIMIT_HIT=1; stop_step USR1' USR1",
                 "trap 'stop_step TERM' TERM", "# layout: tp=2 pp=2 ep=4 etp=1 dp=2", "#SBATCH --open-mode=append",
                 'scancel --signal=TERM "$SLURM_JOB_ID.0"', 'TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}',
                 f"  {sys.executable} \\\n  -m torch.distributed.run"]:
        assert line in text, line
    assert "kill -TERM" not in text  # real srun answers a signal to itself by killing the step
    assert f"-m r1mega.cli train --config {QWEN} parallel.ep=4 optimizer.lr=2e-6\n)" in text
    path = slurm.write_script(job, text, cfg)
    _bash_syntax_ok(path)
    assert (tmp_path / "r1mega-r1_zero_qwen3_30b_a3b.resolved.yaml").exists()


def test_64_node_script_via_cli_dry_run(tmp_path):
    proc = _generate(tmp_path, QWEN, "--nodes", "64", "--requeue", "--container-image", "nvcr.io/x:1",
                     "--command", "demo", "--time", "1-00:00:00", "--dry-run", "trainer.steps=5")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for line in ["#SBATCH --nodes=64", "#SBATCH --requeue", "#SBATCH --time=1-00:00:00",
                 "# world size 512 = 64 node(s) x 8 GPU(s)", "# layout: tp=2 pp=2 ep=8 etp=1 dp=128",
                 "--container-image=nvcr.io/x:1", "REQUEUE_ON_EXIT=1", 'scontrol requeue "$SLURM_JOB_ID"']:
        assert line in text, line
    assert f"-m r1mega.cli demo --config {QWEN} trainer.steps=5\n)" in text
    assert "#SBATCH --partition" not in text and "#SBATCH --account" not in text
    assert not (tmp_path / "out").exists(), "--dry-run must not write anything"
    script = tmp_path / "dry.sbatch"
    script.write_text(text)
    _bash_syntax_ok(script)


def test_deepseek_v3_128_nodes_fits_and_64_does_not(tmp_path):
    ok = _generate(tmp_path, DSV3, "--nodes", "128", "--dry-run")
    assert ok.returncode == 0, ok.stderr
    assert "# layout: tp=8 pp=16 ep=64 etp=1 dp=8" in ok.stdout
    bad = _generate(tmp_path, DSV3, "--nodes", "64", "--dry-run")
    assert bad.returncode == 2
    assert "world size 512" in bad.stderr and "choose parallel.ep" in bad.stderr


def test_bad_layout_fails_fast_and_writes_nothing(tmp_path):
    proc = _generate(tmp_path, QWEN, "--nodes", "1", "--gpus-per-node", "2")  # tp*pp = 4 > 2 ranks
    assert proc.returncode == 2
    assert "world size 2 is not a multiple of tp*pp" in proc.stderr
    assert not (tmp_path / "out").exists()
    typo = _generate(tmp_path, QWEN, "--nodes", "4", "trainer.lr=1e-6")
    assert typo.returncode == 2 and "did you mean 'optimizer.lr'" in typo.stderr


def test_missing_sbatch_is_a_clear_error(tmp_path):
    no_slurm = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                               if not (Path(p) / "sbatch").exists())
    proc = _generate(tmp_path, QWEN, "--nodes", "4", "--command", "demo", env_path=no_slurm)
    assert proc.returncode == 127
    assert "`sbatch` was not found" in proc.stderr and "--dry-run" in proc.stderr
    assert (tmp_path / "out" / "r1mega-r1_zero_qwen3_30b_a3b.sbatch").exists()


def test_cpu_mode_requests_no_gpu(tmp_path):
    proc = _generate(tmp_path, TINY, "--nodes", "2", "--gpus-per-node", "0", "--procs-per-node", "2", "--dry-run",
                     "parallel.ep=4")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert not [line for line in text.splitlines() if line.startswith("#SBATCH") and ("gpu" in line or "gres" in line)
                and "--output" not in line and "--error" not in line]
    for line in ["#SBATCH --cpus-per-task=2", "--nproc-per-node 2", "# world size 4 = 2 node(s) x 2 CPU process(es)",
                 'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"', "# layout: tp=1 pp=1 ep=4 etp=1 dp=4"]:
        assert line in text, line
    bad = _generate(tmp_path, QWEN, "--nodes", "4", "--procs-per-node", "2", "--dry-run")
    assert bad.returncode == 2 and "one process per GPU" in bad.stderr


# ------------------------------------------------------------------ a real Slurm (tests/slurm_cluster.py)

# The payload, on the tiny R1 recipe without evals, one metrics line per step: (r1mega command, overrides, the
# stage that is interrupted, its steps, steps of the stages before it). SFT needs no rollout engine, so a run
# starts in seconds; the signal -> checkpoint -> resume path is the same for every stage kind (GRPO's exact
# resume: tests/test_resume.py).
COMMON = ["data.eval_path=null", "trainer.global_batch_size=8", "parallel.micro_batch_size=4",
          "trainer.log_interval=1", "checkpoint.save_interval=0"]
PAYLOADS = {"sft": ("sft", [*COMMON, "trainer.steps=12"], "sft", 12, 0)}
TIMING = ("time/", "tokens_per_s")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """munged + slurmctld + two slurmd (node names) on this host, for the whole session; stopped by PID."""
    from slurm_cluster import SlurmCluster, SlurmUnavailable

    root = tmp_path_factory.mktemp("slurm")
    root.chmod(0o700)  # munged refuses a key or socket directory others can write
    try:
        cluster = SlurmCluster(root).start()
    except SlurmUnavailable as e:
        if os.environ.get("CI") == "true" and os.geteuid() == 0:  # setup.sh installs them on CI
            pytest.fail(str(e))
        pytest.skip(str(e))
    yield cluster
    cluster.stop()


def _submit(cluster, out: Path, *args: str, payload: str = "sft", nodes: int = 1,
            extra: tuple[str, ...] = ()) -> tuple[int, Path]:
    """``python -m launch.slurm`` (which writes the script and runs ``sbatch``) against the test cluster."""
    from slurm_cluster import free_port

    command, overrides = PAYLOADS[payload][:2]
    cmd = [sys.executable, "-m", "launch.slurm", TINY, "--nodes", str(nodes), "--gpus-per-node", "0",
           "--command", command, "--output-dir", str(out / "logs"), "--master-port", str(free_port()), *args,
           *overrides, f"trainer.output_dir={out / 'run'}", *extra]
    env = dict(cluster.env, OMP_NUM_THREADS="1")  # sbatch passes the environment on to the job
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = int(proc.stdout.split("Submitted batch job")[1].split()[0])
    return job_id, next((out / "logs").glob("*.sbatch"))


def _log(out: Path, job_id: int) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((out / "logs").glob(f"*-{job_id}.*")))


def _steps(out: Path, stage: str = "sft") -> list[int]:
    path = out / "run" / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [r["step"] for r in rows if r["stage"] in ("sft", "grpo") and r.get("stage_name") == stage]


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().replace(str(run), "<run>").splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def _wait(cond, what: str, timeout: float, cluster, job_id: int, out: Path) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f}s; job {cluster.job(job_id)}\n{_log(out, job_id)[-4000:]}")
        time.sleep(0.2)


@pytest.mark.timeout(1800)  # minutes on a loaded 2-core machine
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_time_limit_checkpoints_requeues_and_resumes_mid_stage(tmp_path, slurm_cluster, payload):
    """SIGUSR1 of the time limit -> the trap signals the step -> the workers checkpoint and exit 75 -> requeue ->
    the second attempt resumes mid-stage; metrics.jsonl equals an uninterrupted run's, timings aside.

    slurmctld checks time limits every 30 s (PERIODIC_TIMEOUT, not configurable), so the test pins the signal
    to a known step: once the stage is under way it stops the workers (SIGSTOP), lowers the time limit so
    the next check sends the signal, and lets them go on (SIGCONT) when the trap has run."""
    command, overrides, stage, steps, before = PAYLOADS[payload]
    ref = tmp_path / "ref"
    done = subprocess.run([sys.executable, "-m", "r1mega.cli", command, "--config", TINY, *overrides,
                           f"trainer.output_dir={ref}"], capture_output=True, text=True, timeout=900, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # as in the job: fp32 sums depend on it
    assert done.returncode == 0, done.stderr[-3000:]

    c, out = slurm_cluster, tmp_path / "job"
    job_id, _ = _submit(c, out, "--requeue", "--time", "01:00:00", "--signal-lead", "300", payload=payload)
    _wait(lambda: len(_steps(out, stage)) >= 3, f"3 steps of {stage}", 900, c, job_id, out)
    workers = c.job_pids(job_id, argv_has="r1mega.cli", argv_lacks="torch.distributed.run")
    assert workers, _log(out, job_id)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    stopped_at = len(_steps(out, stage))
    try:
        assert stopped_at < steps - 1
        run_s = sum(int(x) * 60 ** i for i, x in enumerate(reversed(c.job(job_id)["RunTime"].split(":"))))
        # 240..300 s left: within the 300 s lead at the next check (<= 30 s away), not yet at the limit
        c.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={run_s // 60 + 5}")
        _wait(lambda: "got SIGUSR1" in _log(out, job_id), "the time limit's SIGUSR1", 60, c, job_id, out)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    _wait(lambda: c.job(job_id).get("Restarts") == "1", "the requeue", 120, c, job_id, out)
    c.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=60")  # no second signal in the second attempt
    info = c.wait_job(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 900)
    log = _log(out, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]

    # the workers stop after the step they were in (or, stopped between its metrics line and its end, that one)
    run_step = int(log.split("stopped by SIGTERM after step ")[1].split(";")[0])  # the run's global step
    stop_step = run_step - before
    assert stop_step in (stopped_at, stopped_at + 1) and stop_step < steps, log[-4000:]
    order = ["[launch] attempt 1 (restart count 0)", "got SIGUSR1; sending SIGTERM to job step",
             "stopped by SIGTERM after step",
             "workers checkpointed and stopped", "job step exited with 75", f"requeueing {job_id}",
             "[launch] attempt 2 (restart count 1)", f"resuming from {out / 'run' / 'checkpoints'}",
             f"stage {stage} step {stop_step}", "job step exited with 0"]
    at = [log.find(x) for x in order]
    assert -1 not in at and at == sorted(at), dict(zip(order, at))
    assert f"{stage} {payload} step {stop_step + 1}/{steps}" in log  # the resumed stage counts to its own total
    assert _steps(out, stage) == list(range(1, steps + 1))
    assert _metrics(out / "run") == _metrics(ref)


@pytest.mark.timeout(2400)
def test_scancel_on_two_nodes_checkpoints_and_a_resubmission_resumes(tmp_path, slurm_cluster):
    """Two nodes (torchrun agents meet at the c10d rendezvous on the first): scancel -> every process of the
    step gets SIGTERM -> checkpoint, exit 75; ``sbatch`` of the same script again resumes and finishes."""
    c, out, steps = slurm_cluster, tmp_path / "job", 8
    job_id, script = _submit(c, out, "--time", "01:00:00", nodes=2, extra=(f"trainer.steps={steps}", "parallel.ep=2"))
    _wait(lambda: len(_steps(out)) >= 2, "2 steps", 900, c, job_id, out)
    assert c.job(job_id)["NodeList"] == ",".join(c.node_names)
    c.run("scancel", str(job_id))
    info = c.wait_job(job_id, ("CANCELLED",), 120)
    _wait(lambda: "job step exited with" in _log(out, job_id), "the step's end", 240, c, job_id, out)
    log = _log(out, job_id)
    stopped_at = len(_steps(out))
    assert f"stopped by SIGTERM after step {stopped_at}" in log and "job step exited with 75" in log, log[-4000:]
    assert stopped_at < steps and (out / "run" / "checkpoints" / "latest").is_file()

    again = c.sbatch(script)
    info = c.wait_job(again, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 900)
    log = _log(out, again)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert f"stage sft step {stopped_at}" in log and "resuming from" in log, log[-4000:]
    assert _steps(out) == list(range(1, steps + 1))
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["resumed_from"]


def test_invalid_jobs_are_refused_before_submission(tmp_path, slurm_cluster):
    """A recipe that does not fit the world size, and --cpus-per-task above the partition's nodes (which sbatch
    would accept and leave pending forever): refused with the reason, nothing written or queued."""
    c = slurm_cluster
    jobs_before = c.run("squeue", "-h", "-t", "all").stdout
    for args, reason in [(["parallel.ep=3"], "num_experts"),
                         (["--cpus-per-task", str(c.cpus + 1)],
                          f"--cpus-per-task {c.cpus + 1} but partition 'cpu' has 0 node(s)")]:
        proc = subprocess.run([sys.executable, "-m", "launch.slurm", TINY, "--nodes", "1", "--gpus-per-node", "0",
                               "--command", "sft", "--output-dir", str(tmp_path / "logs"), *args],
                              capture_output=True, text=True, timeout=120, cwd=REPO, env=c.env)
        assert proc.returncode == 2 and reason in proc.stderr, proc.stderr
    assert f"Use --cpus-per-task {c.cpus} or less" in proc.stderr and f"{c.host}: {c.cpus}" in proc.stderr
    assert not (tmp_path / "logs").exists()
    assert c.run("squeue", "-h", "-t", "all").stdout == jobs_before


# ------------------------------------------------------------------ local mode


def test_split_r1mega_args():
    assert local.split_r1mega_args(["demo", "--config", "a.yaml", "x.y=1", "--nproc", "1"]) == \
        ("demo", "a.yaml", ["x.y=1"])
    assert local.split_r1mega_args(["demo", "parallel.ep=2"]) == ("demo", None, ["parallel.ep=2"])


def test_local_bad_layout_fails_fast():
    proc = subprocess.run([sys.executable, "-m", "launch.local", "--nproc", "2", "--", "demo", "parallel.tp=4"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert "invalid configuration for 2 process(es)" in proc.stderr


@pytest.mark.timeout(180)
# `local` (torchrun) also runs in every `--nproc` test (resume, rollout engines); slurm's srun path only here
@pytest.mark.parametrize("entry", [pytest.param("local", marks=pytest.mark.slow), "slurm"])
def test_local_mode_trains_two_steps_on_two_processes(tmp_path, entry):
    # one SFT stage of the R1 recipe without evals (no engine): 2 steps take seconds
    out = tmp_path / "run"
    args = ["sft", *SFT_ONLY, "trainer.steps=2", f"trainer.output_dir={out}", "parallel.ep=2"]
    if entry == "local":
        cmd = [sys.executable, "-m", "launch.local", "--nproc", "2", "--timeout", "150", "--", *args]
    else:
        cmd = [sys.executable, "-m", "launch.slurm", str(REPO / "configs" / "r1_tiny_cpu.yaml"), "--local",
               "--nproc", "2", "--timeout", "150", "--command", "sft", *args[3:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["stage"] == "sft"] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_local_timeout_stops_the_whole_group(tmp_path):
    # A command that outlives the timeout: torchrun and its workers must all be gone afterwards.
    t0 = time.monotonic()
    rc = local.run_local(2, ["sft", *SFT_ONLY, "trainer.steps=100000", f"trainer.output_dir={tmp_path}",
                             "parallel.ep=2"],
                         timeout_s=3, grace_s=5)
    assert rc == local.TIMEOUT_EXIT
    assert time.monotonic() - t0 < 30
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "worker processes survived the timeout"


def test_launch_is_importable_from_repo_root():
    assert shutil.which("bash")
    proc = subprocess.run([sys.executable, "-c", "import launch.slurm, launch.local, launch.nodelist"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
