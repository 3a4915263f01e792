"""tools/bench_offpolicy.py: its report on made-up step records, the recipes it runs, its config check.

A real run (both modes through `r1mega train`, vLLM start-ups and model builds) takes minutes on 2 shared
cores, too long for a smoke test; the command is in docs/architecture.md (one-step-off section).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from r1mega.config import load_config

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_offpolicy.py"


def _tool():
    spec = importlib.util.spec_from_file_location("bench_offpolicy", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _history(mode: str, steps: list[float]) -> list[dict]:
    fields = _tool().FIELDS[mode]
    return [{"time/step": s, fields["rollout"]: 1.0, fields["reward"]: 0.0, fields["train"]: 2.0 + i,
             fields["wait"]: 0.5, fields["push"]: 0.1} for i, s in enumerate(steps)]


def test_summary_excludes_the_first_step_and_the_line_format_is_stable():
    tool = _tool()
    history = _history("one_step_off", [30.0, 2.0, 4.0])
    del history[0]["time/push"]  # one-step-off's first step pushes nothing (the engines start on v0)
    s = tool.summarize("one_step_off", history)
    assert s["first_step_s"] == 30.0 and s["s_per_step"] == s["s_per_step_median"] == 3.0
    assert s["train_s"] == 3.5 and s["steps"] == 3
    assert s["overlap_bound"] == pytest.approx(4.5 / 3.5)
    line = tool.format_line("one_step_off", s)
    assert re.fullmatch(r"mode=one_step_off procs=3 \(.*\) steps=3 s_per_step=3\.000 s_per_step_median=3\.000 "
                        r"first_step_s=30\.000 rollout_s=1\.000 reward_s=0\.000 train_s=3\.500 wait_s=0\.500 "
                        r"push_s=0\.100", line), line
    one = tool.summarize("colocated", _history("colocated", [5.0]))  # one step: it is also the mean
    assert one["s_per_step"] == one["first_step_s"] == 5.0
    assert tool.format_line("colocated", one).startswith("mode=colocated procs=2 (")


def test_missing_timing_fields_are_named():
    tool = _tool()
    with pytest.raises(ValueError, match=r"colocated: the step records lack \['time/refit', 'time/reward', 'time/st"):
        tool.summarize("colocated", [{"time/rollout": 1.0}])
    with pytest.raises(ValueError, match="reported no steps"):
        tool.summarize("colocated", [])


def test_both_modes_run_the_same_grpo_recipe_at_their_world_sizes(tmp_path):
    tool = _tool()
    stages = [{"name": "grpo", "kind": "grpo", "steps": 3}]
    overrides = tool.common_overrides(tmp_path / "tok", None, ["rollout.max_new_tokens=16"])
    cfgs = {m: load_config(tool.write_recipe(tmp_path / f"{m}.yaml", stages, m), overrides,
                           world_size=tool.layout(m)[0]) for m in tool.MODES}
    colo, off = cfgs["colocated"], cfgs["one_step_off"]
    assert (colo.rollout.mode, off.rollout.mode, off.rollout.engine_ranks) == ("colocated", "one_step_off", 1)
    assert [(s.name, s.kind, s.steps) for s in off.stages] == [("grpo", "grpo", 3)] and colo.stages == off.stages
    assert colo.data.eval_path is None and colo.data.tokenizer == str(tmp_path / "tok")
    # apart from the mode, the two runs are configured alike
    assert colo.model == off.model and colo.trainer == off.trainer and colo.rl == off.rl and colo.data == off.data
    assert off.rollout.max_new_tokens == colo.rollout.max_new_tokens == 16


def test_a_bad_override_is_refused_before_any_run(tmp_path, capsys):
    assert _tool().main(["--steps", "2", "--out", str(tmp_path), "rl.tis_cap=null"]) == 2
    assert "set rl.tis_cap" in capsys.readouterr().err
    assert not (tmp_path / "tokenizer").exists() and not (tmp_path / "colocated").exists()
