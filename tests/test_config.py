"""Config loading and validation: fast, torch-free, and every bad recipe fails with a useful message."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from r1mega.config import (
    ConfigError,
    ModelConfig,
    ParallelConfig,
    R1Config,
    config_to_yaml,
    derived_dp,
    load_config,
    resolve_model,
    save_config,
    validate_config,
)
from r1mega.config.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Every recipe in configs/ with a world size it is laid out for (see each file's header).
CONFIG_WORLD_SIZES = {
    "demo_cpu.yaml": 1,
    "parity_tiny.yaml": 1,
    "r1_zero_qwen3_30b_a3b.yaml": 32,
    "r1_deepseek_v3_671b.yaml": 1024,
    "r1_tiny_cpu.yaml": 1,
    "r1_zero_tiny_cpu.yaml": 1,
    "distill_tiny_cpu.yaml": 1,
    "r1_zero_deepseek_v2_lite.yaml": 16,
    "r1_zero_moonlight_16b_a3b.yaml": 16,
    "r1_zero_gpt_oss_20b.yaml": 16,
    "demo_gpt_oss_cpu.yaml": 1,
    "r1_zero_glm45_air.yaml": 64,
}


def write_yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(**kwargs) -> ConfigError:
    """Load expecting failure; return the error for message assertions."""
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    return info.value


# --------------------------------------------------------------------------- happy paths


def test_defaults_load_and_resolve_preset():
    cfg = load_config()
    assert isinstance(cfg, R1Config)
    assert isinstance(cfg.parallel, ParallelConfig)
    assert cfg.model.preset == "qwen3_moe" and cfg.model.size == "tiny"
    assert cfg.model.num_layers == 2 and cfg.model.num_experts == 8  # filled from the preset
    assert cfg.reward.terms[0].name == "accuracy"


def test_yaml_then_overrides_and_overrides_win(tmp_path):
    path = write_yaml(tmp_path, "optimizer:\n  lr: 1e-5\n  name: sgd\ntrainer:\n  steps: 7\n")
    cfg = load_config(path, overrides=["optimizer.lr=1e-6", "parallel.micro_batch_size=2"])
    assert cfg.optimizer.lr == pytest.approx(1e-6)  # override beats YAML
    assert cfg.optimizer.name == "sgd"  # YAML beats default
    assert cfg.trainer.steps == 7
    assert cfg.parallel.micro_batch_size == 2
    assert isinstance(cfg.optimizer.lr, float)


def test_list_section_override():
    cfg = load_config(overrides=["reward.terms=[{name: accuracy, weight: 2}]"])
    assert [(t.name, t.weight) for t in cfg.reward.terms] == [("accuracy", 2.0)]


def test_preset_fills_fields_and_explicit_fields_win(tmp_path):
    path = write_yaml(tmp_path, "model:\n  preset: mixtral\n  num_layers: 4\n")
    cfg = load_config(path, overrides=["model.num_experts=2"])
    assert cfg.model.num_layers == 4 and cfg.model.num_experts == 2  # explicit
    assert cfg.model.hidden_size == 64 and cfg.model.norm_epsilon == 1e-5  # from mixtral tiny


def test_resolve_model_directly():
    resolved = resolve_model(ModelConfig(preset="deepseek_v3", size="tiny", hidden_size=32))
    assert resolved.hidden_size == 32
    assert resolved.multi_latent_attention is True and resolved.kv_lora_rank == 32


def test_configs_dir_is_fully_covered():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(CONFIG_WORLD_SIZES)


@pytest.mark.parametrize("name", sorted(CONFIG_WORLD_SIZES))
def test_each_config_loads_and_validates(name):
    cfg = load_config(CONFIGS / name, world_size=CONFIG_WORLD_SIZES[name])
    validate_config(cfg, CONFIG_WORLD_SIZES[name])
    assert cfg.model.num_layers is not None
    assert (CONFIGS / name).read_text().startswith("#"), "each recipe starts with a comment header"


def test_brief_values_of_cluster_recipes():
    qwen = load_config(CONFIGS / "r1_zero_qwen3_30b_a3b.yaml", world_size=32)
    assert (qwen.parallel.tp, qwen.parallel.pp, qwen.parallel.ep) == (2, 2, 8)
    assert (qwen.rollout.n, qwen.rollout.max_new_tokens, qwen.trainer.global_batch_size) == (16, 8192, 512)
    assert derived_dp(qwen.parallel, 32) == 8
    dsv3 = load_config(CONFIGS / "r1_deepseek_v3_671b.yaml", world_size=1024)
    assert (dsv3.parallel.tp, dsv3.parallel.pp, dsv3.parallel.ep) == (8, 16, 64)
    assert dsv3.model.num_experts == 256 and dsv3.model.precision == "bf16"


def test_save_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "r1_zero_qwen3_30b_a3b.yaml", overrides=["trainer.steps=3"])
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert saved.is_file() and "num_layers: 48" in config_to_yaml(cfg)
    assert load_config(saved) == cfg


def test_validate_accepts_unresolved_defaults_and_does_not_mutate():
    cfg = R1Config()
    validate_config(cfg, world_size=1)
    assert cfg.model.num_layers is None


def test_derived_dp():
    assert derived_dp(ParallelConfig(tp=2, pp=2), 16) == 4
    assert derived_dp(ParallelConfig(tp=2, dp=3)) == 3
    with pytest.raises(ConfigError, match="no world size is known"):
        derived_dp(ParallelConfig())
    with pytest.raises(ConfigError, match="not a multiple of tp\\*pp=4"):
        derived_dp(ParallelConfig(tp=2, pp=2), 6)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_config_package_does_not_import_torch():
    code = (
        "import sys; from r1mega.config import load_config; from r1mega.config.paths import path_problems; "
        "path_problems(load_config('configs/r1_deepseek_v3_671b.yaml', world_size=1024)); "
        "bad = [m for m in ('torch', 'megatron', 'vllm', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --------------------------------------------------------------------------- bad configs


BAD_OVERRIDES = [
    # (id, overrides, world_size, phrases that must all appear)
    ("unknown_key", ["parallel.tpp=2"], None,
     ["unknown key 'tpp' in section 'parallel'", "did you mean 'parallel.tp'?"]),
    ("misplaced_key", ["model.tp=2"], None, ["did you mean 'parallel.tp'?"]),
    ("unknown_section", ["optimzer.lr=1e-6"], None,
     ["unknown section 'optimzer'", "did you mean 'optimizer'?"]),
    ("unknown_key_in_list_item", ["reward.terms=[{name: format, wieght: 1}]"], None,
     ["unknown key 'wieght'", "did you mean 'reward.terms[0].weight'?"]),
    ("bad_type", ["parallel.tp=abc"], None, ["parallel.tp='abc'", "expected int"]),
    ("null_for_required", ["trainer.steps=null"], None, ["trainer.steps", "expected int"]),
    ("no_equals", ["parallel.tp"], None, ["override 'parallel.tp' has no '='"]),
    ("tp_heads", ["parallel.tp=3"], 3,
     ["parallel.tp=3 does not divide model.num_attention_heads=4: choose tp from [1, 2, 4]"]),
    ("world_not_multiple", ["parallel.tp=2"], 3, ["world size 3 is not a multiple of tp*pp=2*1=2"]),
    ("world_mismatch", ["parallel.dp=4"], 2,
     ["tp*pp*dp = 1*1*4 = 4 but world size is 2: set parallel.dp=0 to derive it"]),
    ("experts_ep", ["parallel.ep=3"], 3,
     ["model.num_experts=8 is not divisible by parallel.ep=3: choose ep from [1, 2, 4, 8]"]),
    ("expert_grid", ["parallel.ep=4"], 2, ["parallel.etp*ep = 1*4 = 4 does not divide tp*dp = 1*2 = 2"]),
    ("layers_pp", ["parallel.pp=3"], None, ["model.num_layers=2 is not divisible by parallel.pp=3"]),
    ("uneven_pp", ["model.preset=deepseek_v3", "parallel.pp=3",
                   "parallel.num_layers_in_first_pipeline_stage=1"], None,
     ["3 middle layers do not divide over 2 middle pipeline stages",
      "set parallel.num_layers_in_first_pipeline_stage=2"]),
    ("unknown_preset", ["model.preset=llama"], None, ["model.preset='llama' is unknown"]),
    ("unknown_size", ["model.size=huge"], None, ["model.size='huge' is not a size of preset"]),
    ("topk_gt_experts", ["model.moe_router_topk=9"], None,
     ["model.moe_router_topk=9 must be between 1 and model.num_experts=8"]),
    ("router_groups", ["model.moe_router_num_groups=3"], None,
     ["model.moe_router_num_groups=3 does not divide model.num_experts=8"]),
    ("dense_layers", ["model.first_k_dense_layers=2"], None,
     ["model.num_layers=2 must exceed model.first_k_dense_layers=2"]),
    ("sp_off_with_tp_moe", ["parallel.tp=2", "parallel.sequence_parallel=false"], None,
     ["parallel.sequence_parallel=false with parallel.tp=2", "set parallel.sequence_parallel=true"]),
    ("bad_precision", ["model.precision=fp16"], None,
     ["model.precision='fp16' is not supported: choose one of ['fp32', 'bf16', 'fp8']"]),
    ("global_batch", ["trainer.global_batch_size=10"], 4,
     ["trainer.global_batch_size=10 is not divisible by dp*micro_batch_size = 4*1 = 4"]),
    ("seq_gt_positions", ["model.seq_length=4096"], None,
     ["model.seq_length=4096 exceeds model.max_position_embeddings=1024"]),
    ("mla_missing_dims", ["model.multi_latent_attention=true"], None,
     ["model.multi_latent_attention=true needs", "model.kv_lora_rank"]),
    ("bad_optimizer", ["optimizer.name=adamw"], None, ["optimizer.name='adamw' is not supported"]),
    ("bad_lr", ["optimizer.lr=0"], None, ["optimizer.lr=0.0 must be > 0"]),
    ("bad_decay", ["optimizer.lr_decay_style=step"], None, ["optimizer.lr_decay_style='step'"]),
    ("bad_temperature", ["rollout.temperature=0"], None, ["rollout.temperature=0.0 must be > 0"]),
    ("bad_top_p", ["rollout.top_p=1.5"], None, ["rollout.top_p=1.5 must be in (0, 1]"]),
    ("bad_engine_timeout", ["rollout.engine_call_timeout_s=0"], None,
     ["rollout.engine_call_timeout_s=0.0 must be > 0 seconds, or null"]),
    ("bad_score_fn", ["model.moe_router_score_function=relu"], None,
     ["model.moe_router_score_function='relu'"]),
    ("bad_balancing", ["model.moe_router_load_balancing_type=sinkhorn"], None,
     ["model.moe_router_load_balancing_type='sinkhorn'"]),
    ("bad_tp_value", ["parallel.tp=0"], None, ["parallel.tp=0 must be >= 1"]),
    ("dense_ep", ["model.preset=qwen3", "parallel.ep=2"], 2,
     ["parallel.ep=2 with model.preset='qwen3': a dense model has no experts", "set parallel.ep=1"]),
    ("llama3_context", ["model.preset=llama3", "model.original_max_position_embeddings=4096"], None,
     ["model.original_max_position_embeddings=4096 with rope_type=llama3", "set it to 8192"]),
    ("bad_rope", ["model.rope_type=ntk"], None, ["model.rope_type='ntk' is not supported"]),
    ("bad_fp8_recipe", ["model.fp8_recipe=fast"], None, ["model.fp8_recipe='fast'", "delayed"]),
    ("bad_keep_last", ["checkpoint.keep_last=-1"], None, ["checkpoint.keep_last=-1 must be >= 0"]),
    ("empty_resume", ["checkpoint.resume=''"], None, ["checkpoint.resume is empty: use auto"]),
]


def test_an_mla_policy_vllm_cannot_build_is_refused_before_any_stage():
    """The demo (a GRPO stage, vLLM engine) on tiny DeepSeek-V2: its latent + rope width (40) is not one vLLM's
    MLA takes; refused at load, naming the engine that can run it. SFT-only recipes are not concerned."""
    demo = str(CONFIGS / "demo_cpu.yaml")
    message = str(config_error(path=demo, overrides=["model.preset=deepseek_v2"]))
    assert "model.kv_lora_rank + model.qk_pos_emb_head_dim = 40: vLLM's MLA attention takes 320 / 512 / 576" \
        in message and "use rollout.engine=megatron" in message
    load_config(path=demo, overrides=["model.preset=deepseek_v2", "rollout.engine=megatron"])
    load_config(path=demo, overrides=["model.preset=deepseek_v2", "stages=[{name: sft, kind: sft}]",
                                      "data.eval_path=null"])


def test_vllm_mla_head_sizes_are_the_installed_vllms():
    mla = pytest.importorskip("vllm.model_executor.layers.attention.mla_attention")
    from r1mega.config.validate import VLLM_MLA_HEAD_SIZES

    assert tuple(mla.MLACommonBackend.get_supported_head_sizes()) == VLLM_MLA_HEAD_SIZES


@pytest.mark.parametrize("preset", ["qwen2", "qwen3", "llama3"])
def test_dense_presets_resolve_without_moe_fields(preset):
    for size in PRESETS[preset]:
        m = resolve_model(ModelConfig(preset=preset, size=size))
        assert m.num_experts is None and m.moe_ffn_hidden_size is None, (preset, size)
        assert m.num_attention_heads % m.num_query_groups == 0
    tiny = resolve_model(ModelConfig(preset=preset))
    assert (tiny.add_qkv_bias, tiny.qk_layernorm, tiny.rope_type) == {
        "qwen2": (True, False, "rope"), "qwen3": (False, True, "rope"), "llama3": (False, False, "llama3")}[preset]


@pytest.mark.parametrize(
    "overrides,world_size,phrases", [case[1:] for case in BAD_OVERRIDES],
    ids=[case[0] for case in BAD_OVERRIDES],
)
def test_bad_override_raises_with_message(overrides, world_size, phrases):
    message = str(config_error(overrides=overrides, world_size=world_size))
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in:\n{message}"


def test_unknown_key_in_yaml_names_file_and_section(tmp_path):
    path = write_yaml(tmp_path, "parallel:\n  tp: 1\n  expert_parallel: 2\n")
    message = str(config_error(path=path))
    assert "unknown key 'expert_parallel' in section 'parallel'" in message
    assert str(path) in message


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = str(config_error(path=missing))
    assert "does not exist" in message and str(missing) in message


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write_yaml(tmp_path, "model:\n  preset: qwen3_moe\n  size: [tiny\ntrainer:\n  steps: 1\n")
    message = str(config_error(path=path))
    assert str(path) in message and "malformed YAML at line" in message


def test_yaml_top_level_must_be_mapping(tmp_path):
    path = write_yaml(tmp_path, "- 1\n- 2\n")
    assert "top level must be a mapping" in str(config_error(path=path))


def test_section_given_a_scalar(tmp_path):
    path = write_yaml(tmp_path, "parallel: 2\n")
    assert "parallel (in" in str(config_error(path=path))


def test_many_problems_reported_together():
    err = config_error(
        overrides=["parallel.tp=3", "model.moe_router_topk=9", "model.precision=fp16",
                   "rollout.temperature=0"],
    )
    message = str(err)
    assert len(err.problems) >= 4 and "problems" in message.splitlines()[0]
    for phrase in ("parallel.tp=3 does not divide", "moe_router_topk=9", "'fp16'", "temperature"):
        assert phrase in message
    assert all(line.startswith("  - ") for line in message.splitlines()[1:])


def test_key_and_type_problems_reported_together(tmp_path):
    path = write_yaml(tmp_path, "trainer:\n  stepz: 3\n")
    err = config_error(path=path, overrides=["parallel.tp=abc", "rollout.nn=3", "oops"])
    assert len(err.problems) == 4
    for phrase in ("'stepz'", "parallel.tp='abc'", "'nn'", "override 'oops' has no '='"):
        assert phrase in str(err)


def test_validate_config_collects_on_dataclass_directly():
    cfg = R1Config()
    cfg.parallel = replace(cfg.parallel, tp=3, ep=3)
    cfg.optimizer = replace(cfg.optimizer, lr=-1.0)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, world_size=4)
    message = str(info.value)
    assert "world size 4 is not a multiple of tp*pp=3*1=3" in message
    assert "model.num_experts=8 is not divisible by parallel.ep=3" in message
    assert "optimizer.lr=-1.0 must be > 0" in message
