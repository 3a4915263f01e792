"""Every supported layout must train exactly like one process (loss, grads, updated params).

Each layout runs in fresh gloo processes with a timeout (see r1mega.train.parallel_check).
"""

from __future__ import annotations

import pytest

from r1mega.config.errors import ConfigError
from r1mega.config.schema import ModelConfig
from r1mega.train.parallel_check import CheckSpec, Layout, check_layouts, format_table, run_layout

LAYOUTS = ["tp2", "ep2", "pp2", "tp2ep2", "tp2ep2pp2"]
TOL = 1e-3  # relative; float32 on CPU gives ~1e-5 (grads) and ~1e-4 (Adam updates)
TIMEOUT_S = 240


def _spec(preset: str) -> CheckSpec:
    return CheckSpec(model=ModelConfig(preset=preset), steps=2, global_batch=4, seq_length=32)


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def preset_and_reference(request):
    spec = _spec(request.param)
    return request.param, spec, run_layout(spec, Layout(), TIMEOUT_S)


@pytest.mark.timeout(900)
def test_all_layouts_match_single_process(preset_and_reference):
    preset, spec, reference = preset_and_reference
    reports = check_layouts(spec, [Layout.parse(x) for x in LAYOUTS], TIMEOUT_S, reference=reference)
    print(format_table(preset, reports))
    assert [r.layout for r in reports[1:]] == ["tp2", "ep2dp2", "pp2", "tp2ep2dp2", "tp2pp2ep2dp2"]
    for r in reports[1:]:
        assert r.max_rel_err < TOL, f"{preset} {r.layout}: {r}"
    # the run really trained: the second step's loss differs from the first
    assert reports[0].losses[0] != reports[0].losses[1]


@pytest.mark.timeout(300)
def test_mixtral_tp2_and_ep2_match():
    spec = _spec("mixtral")
    reports = check_layouts(spec, [Layout.parse("tp2"), Layout.parse("ep2")], TIMEOUT_S)
    for r in reports[1:]:
        assert r.max_rel_err < TOL, f"mixtral {r.layout}: {r}"


@pytest.mark.timeout(300)
def test_check_catches_megatron_mla_rope_gradient_bug(monkeypatch):
    """Without r1mega's fix, megatron's MLA rope-key gradient is wrong at TP2: the check must see it."""
    monkeypatch.setenv("R1MEGA_SKIP_MLA_FIX", "1")
    reports = check_layouts(_spec("deepseek_v3"), [Layout.parse("tp2")], TIMEOUT_S)
    assert reports[1].grad_rel_err > 0.05


def test_layout_parse_and_world_size():
    assert Layout.parse("tp2ep2pp2") == Layout(tp=2, pp=2, ep=2, dp=2, etp=2)
    assert Layout.parse("tp2ep2pp2").world_size == 8
    assert Layout.parse("ep4").world_size == 4
    assert Layout.parse("tp2ep2etp1") == Layout(tp=2, ep=2, etp=1, dp=1)
    for bad in ["tp", "xx2", "tp2foo", ""]:
        with pytest.raises(ValueError, match="write it like"):
            Layout.parse(bad)


def test_impossible_layout_fails_before_spawning():
    spec = _spec("qwen3_moe")  # 8 experts, 4 heads, 2 layers
    with pytest.raises(ConfigError, match="num_layers"):
        check_layouts(spec, [Layout.parse("pp4")], TIMEOUT_S, reference={"losses": []})
    with pytest.raises(ConfigError, match="num_attention_heads"):
        check_layouts(spec, [Layout.parse("tp8")], TIMEOUT_S, reference={"losses": []})


@pytest.mark.timeout(120)
def test_worker_failure_reports_rank_log(tmp_path):
    bad = CheckSpec(model=ModelConfig(preset="qwen3_moe"), steps=1, global_batch=3)  # 3 % dp2
    with pytest.raises(RuntimeError, match=r"rank \d failed"):
        run_layout(bad, Layout.parse("dp2"), timeout_s=60)
