"""One-step-off-policy GRPO (rollout.mode=one_step_off): engines on their own ranks of the launcher's world
generate batch k+1 while the learners train on batch k; weights by bucketed broadcast; staleness per sample."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from r1mega.config import ConfigError, load_config

HERE = Path(__file__).parent


def test_staleness_bound_leaves_stale_samples_out_of_the_loss():
    from r1mega.rl.learner import LearnerBatch
    from r1mega.train.offpolicy import apply_staleness_bound

    batch = LearnerBatch(torch.zeros(3, 5, dtype=torch.long), torch.ones(3, 4))
    assert apply_staleness_bound(batch, [0, 2, 1], max_staleness=1) == [1]
    assert batch.loss_mask.sum(-1).tolist() == [4.0, 0.0, 4.0]


def test_one_step_off_config_is_validated():
    with pytest.raises(ConfigError, match="set rl.tis_cap"):
        load_config(None, ["rollout.mode=one_step_off", "rl.tis_cap=null"])
    with pytest.raises(ConfigError, match="rollout.mode='async' is not supported"):
        load_config(None, ["rollout.mode=async"])
    with pytest.raises(ConfigError, match="leaves no learner rank"):
        load_config(None, ["rollout.mode=one_step_off", "rollout.engine_ranks=2"], world_size=2)
    # the layout is checked on the learner ranks only: 3 processes = 2 learners (dp2) + 1 engine
    cfg = load_config(None, ["rollout.mode=one_step_off", "trainer.global_batch_size=8",
                             "parallel.micro_batch_size=4"], world_size=3)
    assert cfg.rollout.mode == "one_step_off" and cfg.rollout.engine_ranks == 1


def _run(tmp_path: Path, name: str, steps: int) -> dict:
    pytest.importorskip("vllm")
    from r1mega.platform.spawn import free_port, spawn_ranks

    root = tmp_path / name
    overrides = ["rollout.mode=one_step_off", "rollout.engine_ranks=1", "rl.tis_cap=2.0",
                 "trainer.global_batch_size=16", "rollout.n=4", "rollout.max_new_tokens=16",
                 "parallel.micro_batch_size=4", "rollout.refit_bucket_mb=1", "optimizer.lr=1e-3",
                 "optimizer.warmup_steps=0"]
    spec = {"root": str(root), "report": str(root / "report.json"), "overrides": overrides, "steps": steps}
    spawn_ranks([str(HERE / "offpolicy_worker.py"), json.dumps(spec)], 3, timeout_s=280, name=f"offpolicy-{name}",
                env={"R1MEGA_TRANSFER_PORT": str(free_port())})
    return json.loads((root / "report.json").read_text())


@pytest.mark.timeout(600)
def test_one_step_off_trains_with_staleness_one_and_is_reproducible(tmp_path):
    """3 processes of one launcher world: 2 learners (data parallel) + 1 engine rank. Every sample after
    the first step was generated one optimizer step earlier; two runs with the same seed agree exactly."""
    a = _run(tmp_path, "a", steps=3)
    print(json.dumps(a, indent=1), file=sys.stderr)
    assert a["learners"] == 2 and a["world"] == 3
    hist = a["history"]
    assert [r["step"] for r in hist] == [1, 2, 3]
    assert set(hist[0]["staleness"]) == {0}
    for r in hist[1:]:
        assert set(r["staleness"]) == {1}, r["staleness"]
        assert r["staleness/dropped"] == 0
        # the engine's log-probs come from the previous weights: the IS correction sees a real lag
        assert r["logprob_mismatch"] > 1e-4
    assert hist[0]["logprob_mismatch"] < 1e-3  # the first batch is on-policy (engine = initial weights)
    assert all(not r["skipped"] and r["grad_norm"] > 0 for r in hist)
    # after the final bucketed push the engine holds exactly the learner's weights
    assert a["final_parity_max_abs"] < 1e-4, a["final_parity_max_abs"]
    b = _run(tmp_path, "b", steps=3)
    assert b == a, "same seed, different results"
