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
                 '--nnodes "$SLURM_NNODES"', "trap 'TIME_LIMIT_HIT=1; forward_to_step USR1' USR1",
                 "trap 'forward_to_step TERM' TERM", "# layout: tp=2 pp=2 ep=4 etp=1 dp=2"]:
        assert line in text, line
    assert f"-m r1mega.cli train --config {QWEN} parallel.ep=4 optimizer.lr=2e-6 &" in text
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
    assert f"-m r1mega.cli demo --config {QWEN} trainer.steps=5 &" in text
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


def test_submit_writes_script_and_calls_sbatch(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "sbatch").write_text(f"#!/bin/bash\necho \"$@\" > {tmp_path}/sbatch_args\necho Submitted 42\n")
    (fake_bin / "sbatch").chmod(0o755)
    proc = _generate(tmp_path, QWEN, "--nodes", "4", "--command", "demo",
                     env_path=f"{fake_bin}:{os.environ['PATH']}")
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / "out" / "r1mega-r1_zero_qwen3_30b_a3b.sbatch"
    assert (tmp_path / "sbatch_args").read_text().strip() == str(script)
    _bash_syntax_ok(script)


def test_missing_sbatch_is_a_clear_error(tmp_path):
    no_slurm = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                               if not (Path(p) / "sbatch").exists())
    proc = _generate(tmp_path, QWEN, "--nodes", "4", "--command", "demo", env_path=no_slurm)
    assert proc.returncode == 127
    assert "`sbatch` was not found" in proc.stderr and "--dry-run" in proc.stderr
    assert (tmp_path / "out" / "r1mega-r1_zero_qwen3_30b_a3b.sbatch").exists()


def test_usr1_is_forwarded_as_sigterm_and_the_job_requeued(tmp_path):
    """Run the generated script with fake srun/scontrol: SIGUSR1 -> SIGTERM to the step -> requeue."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(
        "#!/bin/bash\n"
        f"echo \"$@\" > {tmp_path}/srun_args\n"
        f"trap 'echo TERM > {tmp_path}/srun_signal; exit 143' TERM\n"
        f"touch {tmp_path}/srun_started\n"
        "for i in $(seq 300); do sleep 0.1; done\n")
    (fake / "scontrol").write_text(
        "#!/bin/bash\n"
        f"echo \"$@\" >> {tmp_path}/scontrol_calls\n"
        "if [ \"$1\" = show ]; then printf 'gpu-01\\ngpu-02\\n'; fi\n")
    for f in ("srun", "scontrol"):
        (fake / f).chmod(0o755)
    job = slurm.SlurmJob(config=QWEN, nodes=4, requeue=True, output_dir=str(tmp_path / "out"), command="demo")
    script = slurm.write_script(job, slurm.render_sbatch(job))
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-[01-02]",
               SLURM_NNODES="4", SLURM_JOB_ID="77")
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "srun_started").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert (tmp_path / "srun_signal").read_text().strip() == "TERM"
    assert "rendezvous gpu-01:29500" in err
    calls = (tmp_path / "scontrol_calls").read_text().splitlines()
    assert calls == ["show hostnames gpu-[01-02]", "requeue 77"]
    assert "--rdzv-id 77" in (tmp_path / "srun_args").read_text()


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
