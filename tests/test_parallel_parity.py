"""Every supported layout must train exactly like one process (loss, grads, updated params).

Each layout runs in fresh gloo processes with a timeout (see r1mega.train.parallel_check).
"""

from __future__ import annotations

import pytest

from r1mega.config.errors import ConfigError
from r1mega.config.schema import ModelConfig, OptimizerConfig
from r1mega.train.parallel_check import CheckSpec, Layout, check_layouts, format_table, run_layout

LAYOUTS = ["tp2", "ep2", "pp2", "tp2ep2", "tp2ep2pp2"]
# What `make test` (CI) runs of LAYOUTS: every layout up to 4 processes for Qwen3-MoE, and TP (MLA's
# sharded projections) plus TP+EP for DeepSeek-V3. `make test-slow` runs the rest (8 processes).
FAST_LAYOUTS = {"qwen3_moe": ["tp2", "ep2", "pp2", "tp2ep2"], "deepseek_v3": ["tp2", "tp2ep2"]}
TOL = 1e-3  # relative; float32 on CPU gives ~1e-5 (grads) and ~1e-4 (Adam updates)
TIMEOUT_S = 240


def _spec(preset: str) -> CheckSpec:
    return CheckSpec(model=ModelConfig(preset=preset), steps=2, global_batch=4, seq_length=32)


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def preset_and_reference(request):
    spec = _spec(request.param)
    return request.param, spec, run_layout(spec, Layout(), TIMEOUT_S)


def _check_layouts_match(preset_and_reference, layouts: list[str]) -> list:
    preset, spec, reference = preset_and_reference
    reports = check_layouts(spec, [Layout.parse(x) for x in layouts], TIMEOUT_S, reference=reference)
    print(format_table(preset, reports))
    assert len(reports) == len(layouts) + 1
    for r in reports[1:]:
        assert r.max_rel_err < TOL, f"{preset} {r.layout}: {r}"
    # the run really trained: the second step's loss differs from the first
    assert reports[0].losses[0] != reports[0].losses[1]
    return reports


@pytest.mark.timeout(900)
def test_layouts_up_to_four_processes_match_single_process(preset_and_reference):
    reports = _check_layouts_match(preset_and_reference, FAST_LAYOUTS[preset_and_reference[0]])
    assert reports[-1].layout == "tp2ep2dp2"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_remaining_layouts_match_single_process(preset_and_reference):
    rest = [x for x in LAYOUTS if x not in FAST_LAYOUTS[preset_and_reference[0]]]
    reports = _check_layouts_match(preset_and_reference, rest)
    assert reports[-1].layout == "tp2pp2ep2dp2"


@pytest.mark.slow  # MoE under TP and EP in CI: qwen3_moe's layouts; mixtral's mapping: test_bridge
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


# DeepSeek-V3 with 5 layers, the first 3 dense (DeepSeek's first_k_dense_replace): over pp2 as 2 + 3
# layers the dense/MoE boundary falls inside the second stage. 5 layers cannot split evenly over 2
# stages, so the run fails unless megatron gets the uneven split.
UNEVEN_MODEL = ModelConfig(preset="deepseek_v3", num_layers=5, first_k_dense_layers=3)


@pytest.mark.timeout(300)
def test_uneven_pipeline_split_matches_single_process():
    spec = CheckSpec(model=UNEVEN_MODEL, steps=2, global_batch=4, seq_length=32)
    reports = check_layouts(spec, [Layout.parse("pp2first2")], TIMEOUT_S)
    print(format_table("deepseek_v3 5 layers", reports))
    assert reports[1].layout == "pp2first2"
    assert reports[1].max_rel_err < TOL, reports[1]
    assert reports[0].losses[0] != reports[0].losses[1]


DENSE_LAYOUTS = ["tp2", "pp2", "tp2pp2"]


def _dense_spec(preset: str, **overrides) -> CheckSpec:
    # adam_eps 1e-6: the k-projection bias has a zero true gradient (softmax ignores a shift shared by all
    # keys), so its float noise (~1e-8) would otherwise be normalised by Adam into full-size updates that
    # differ between layouts (param error 8e-4 at eps 1e-8; loss and gradients agree either way)
    return CheckSpec(model=ModelConfig(preset=preset, **overrides), steps=2, global_batch=4, seq_length=32,
                     optimizer=OptimizerConfig(lr=1e-3, clip_grad=0.0, adam_eps=1e-6))


@pytest.mark.slow  # qkv bias over tp2/pp2; the dense presets below cover the dense path in CI
@pytest.mark.timeout(600)
def test_dense_qwen2_layouts_match_single_process():
    """Dense student (q/k/v biases): TP2, PP2 and TP2xPP2 train like one process."""
    reports = check_layouts(_dense_spec("qwen2"), [Layout.parse(x) for x in DENSE_LAYOUTS], TIMEOUT_S)
    print(format_table("qwen2", reports))
    assert [r.layout for r in reports[1:]] == DENSE_LAYOUTS
    for r in reports[1:]:
        assert r.max_rel_err < TOL, f"qwen2 {r.layout}: {r}"
    assert reports[0].losses[0] != reports[0].losses[1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("preset,overrides,layout", [
    ("qwen3", {"tie_word_embeddings": True}, "pp2"),  # the last stage's output layer is the embedding
    pytest.param("llama3", {}, "tp2", marks=pytest.mark.slow),  # TP attention in CI: the MoE layouts above
])
def test_dense_presets_match_single_process(preset, overrides, layout):
    reports = check_layouts(_dense_spec(preset, **overrides), [Layout.parse(layout)], TIMEOUT_S)
    print(format_table(preset, reports))
    assert reports[1].max_rel_err < TOL, f"{preset} {layout}: {reports[1]}"


def test_dense_preset_refuses_expert_parallelism():
    with pytest.raises(ConfigError, match="dense model has no experts"):
        check_layouts(_dense_spec("qwen3"), [Layout.parse("ep2")], TIMEOUT_S, reference={"losses": []})


def test_layout_parse_and_world_size():
    assert Layout.parse("tp2ep2pp2") == Layout(tp=2, pp=2, ep=2, dp=2, etp=2)
    assert Layout.parse("tp2ep2pp2").world_size == 8
    assert Layout.parse("ep4").world_size == 4
    assert Layout.parse("tp2ep2etp1") == Layout(tp=2, ep=2, etp=1, dp=1)
    uneven = Layout.parse("pp2first2")
    assert uneven == Layout(pp=2, etp=1, first=2) and uneven.name() == "pp2first2" and uneven.world_size == 2
    assert Layout.parse("pp3first1last1").parallel_config(1).num_layers_in_last_pipeline_stage == 1
    assert Layout.parse("pp2").parallel_config(1).num_layers_in_first_pipeline_stage is None

    # context parallelism: the expert grid is carved out of tp*cp*dp, so cp2ep2 needs no data parallelism
    assert Layout.parse("cp2ep2") == Layout(ep=2, etp=1, dp=1, cp=2) and Layout.parse("cp2ep2").world_size == 2
    assert Layout.parse("cp2tp2ep2").world_size == 4 and Layout.parse("cp2pp2").world_size == 4
    for bad in ["tp", "xx2", "tp2foo", "", "pp2first0"]:
        with pytest.raises(ValueError, match="write it like"):
            Layout.parse(bad)


def test_impossible_layout_fails_before_spawning():
    spec = _spec("qwen3_moe")  # 8 experts, 4 heads, 2 layers
    with pytest.raises(ConfigError, match="num_layers"):
        check_layouts(spec, [Layout.parse("pp4")], TIMEOUT_S, reference={"losses": []})
    with pytest.raises(ConfigError, match="num_attention_heads"):
        check_layouts(spec, [Layout.parse("tp8")], TIMEOUT_S, reference={"losses": []})
    with pytest.raises(ConfigError, match="3 middle layers do not divide over 2 middle pipeline stages"):
        check_layouts(_spec("deepseek_v3"), [Layout.parse("pp3first1")], TIMEOUT_S, reference={"losses": []})


@pytest.mark.timeout(120)
def test_worker_failure_reports_rank_log(tmp_path):
    bad = CheckSpec(model=ModelConfig(preset="qwen3_moe"), steps=1, global_batch=3)  # 3 % dp2
    with pytest.raises(RuntimeError, match=r"rank \d failed"):
        run_layout(bad, Layout.parse("dp2"), timeout_s=60)


def _adam_run(initial: dict, grads: dict, lr: float = 1e-3, eps: float = 1e-8) -> dict:
    """A run_layout-like result of one Adam step (bias-corrected first step: lr * g / (|g| + eps))."""
    final = {n: p - lr * grads[n] / (grads[n].abs() + eps) for n, p in initial.items()}
    return {"losses": [1.0], "initial": initial, "grads": grads, "final": final}


def test_compare_ignores_adam_noise_in_tiny_gradients_but_catches_wrong_updates():
    """Gradients from 1e-1 down to 1e-11 with 1e-7 float noise (a token-sum loss in another reduction
    order): Adam flips the sign of the step on the tiny ones, which the weighted param error ignores; a
    missing, doubled, scaled or misplaced update is still ~1 or more."""
    import torch

    from r1mega.train.parallel_check import compare

    gen = torch.Generator().manual_seed(0)
    initial = {"a": torch.randn(64, 32, generator=gen), "b": torch.randn(128, generator=gen)}
    grads = {n: torch.randn(p.shape, generator=gen).sign() * 10 ** (-10 * torch.rand(p.shape, generator=gen) - 1)
             for n, p in initial.items()}
    ref = _adam_run(initial, grads)
    noisy_grads = {n: g + 1e-7 * torch.randn(g.shape, generator=gen) for n, g in grads.items()}
    noisy = _adam_run(initial, noisy_grads)
    _, grad_err, param_err = compare(ref, noisy)
    flipped = sum(int((noisy["final"][n] - ref["final"][n]).abs().gt(1e-3).sum()) for n in grads)
    unweighted = max(float((noisy["final"][n] - f).norm() / (f - initial[n]).norm()) for n, f in ref["final"].items())
    assert flipped > 100 and unweighted > 0.1, "the noise case must flip many Adam steps"
    assert grad_err < 1e-5 and param_err < TOL, (grad_err, param_err)  # half the elements lie in the noise
    assert compare(ref, ref) == (0.0, 0.0, 0.0)

    def with_final(name: str, tensor):
        return dict(noisy, final=dict(noisy["final"], **{name: tensor}))

    update = noisy["final"]["a"] - initial["a"]
    half = initial["a"].size(0) // 2
    wrong = {
        "missing step": with_final("a", initial["a"]),
        "doubled step": with_final("a", initial["a"] + 2 * update),
        "lr off by 2%": with_final("b", initial["b"] + 1.02 * (noisy["final"]["b"] - initial["b"])),
        "shards swapped": with_final("a", torch.cat([noisy["final"]["a"][half:], noisy["final"]["a"][:half]])),
    }
    # gradient shards mixed up before the step: the noise estimate is as large as the gradients themselves
    swapped_grads = dict(noisy_grads, a=torch.cat([noisy_grads["a"][half:], noisy_grads["a"][:half]]))
    wrong["step on swapped gradient shards"] = _adam_run(initial, swapped_grads)
    for what, got in wrong.items():
        _, _, param_err = compare(ref, got)
        assert param_err > (1e-2 if what.startswith("lr") else 0.5), f"{what}: param error {param_err:.2e}"
