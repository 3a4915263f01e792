"""tools/bench_rl_step.py --dry: the RL step of ``tools/gpu_check.sh rl`` on the demo's tiny model on CPU
(the same code path as the GPU check: ``r1mega train``'s GRPO stage with ``rollout.engine=megatron``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_rl_step.py"


@pytest.mark.timeout(300)
def test_dry_mode_runs_grpo_steps_with_the_megatron_engine_and_reports_every_figure(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), "--dry", "--steps", "2", "--prompts", "2", "--n", "2",
                           "--new-tokens", "8", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert sum(line.startswith("step ") for line in lines) == 2
    m = re.fullmatch(r"rl_step device=cpu layers=2 tokens_per_s_per_gpu=(\S+) gen_tokens_per_s=(\S+) "
                     r"train_tokens_per_s=(\S+) mfu=(\S+) peak_mem_gib=(\S+)", lines[-1])
    assert m, lines[-1]
    values = [float(v) for v in m.groups()]
    assert all(v > 0 for v in values) and values[3] < 1.0
    assert values[2] > values[0]  # the step's tokens over its training part only: faster than over the whole step
    for line in lines[:2]:  # fp32: the engine's log-probs are the learner's (probe and per-step mismatch)
        parity, mismatch = (float(v) for v in re.search(r"parity=(\S+) mismatch=(\S+)", line).groups())
        assert parity <= 1e-5 and mismatch <= 1e-5, line
