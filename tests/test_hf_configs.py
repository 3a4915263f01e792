"""The published config.json of real models maps to the matching r1mega preset size, field for field;
what the r1mega model cannot represent is refused with the field's name (see fixtures/hf_configs)."""

from __future__ import annotations

import copy
import json
from dataclasses import fields
from pathlib import Path

import pytest

from r1mega.bridge.fp8 import block_size
from r1mega.bridge.hf_config import from_hf_config, to_hf_config
from r1mega.bridge.rules import BridgeError
from r1mega.config.presets import resolve_model
from r1mega.config.schema import ModelConfig

FIXTURES = Path(__file__).with_name("fixtures") / "hf_configs"
REAL = {  # published model -> (preset, size)
    "Qwen3-30B-A3B": ("qwen3_moe", "30b_a3b"),
    "Qwen3-235B-A22B": ("qwen3_moe", "235b_a22b"),
    "DeepSeek-V3": ("deepseek_v3", "671b"),
    "DeepSeek-R1-Distill-Qwen-7B": ("qwen2", "r1_distill_7b"),
    "Llama-3.1-8B": ("llama3", "8b"),
    "DeepSeek-V2-Lite": ("deepseek_v2", "lite"),
    "Moonlight-16B-A3B": ("deepseek_v3", "moonlight_16b_a3b"),
    "Kimi-K2": ("deepseek_v3", "kimi_k2"),
    "GLM-4.5-Air": ("glm4_moe", "glm45_air"),
    "GLM-4.5": ("glm4_moe", "glm45"),
    "GLM-4.6": ("glm4_moe", "glm46"),
}
NOT_ARCHITECTURE = {"preset", "size", "precision", "fp8_recipe", "seq_length", "seed", "moe_grouped_experts"}


def _config(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.mark.parametrize("name", sorted(REAL))
def test_published_config_maps_to_its_preset_field_for_field(name):
    preset, size = REAL[name]
    got = from_hf_config(_config(name))
    want = resolve_model(ModelConfig(preset=preset, size=size))
    assert (got.preset, got.size) == (preset, size)
    checked = [f.name for f in fields(ModelConfig) if f.name not in NOT_ARCHITECTURE]
    diffs = {f: (getattr(got, f), getattr(want, f)) for f in checked if getattr(got, f) != getattr(want, f)}
    assert not diffs, diffs
    assert len(checked) > 35


@pytest.mark.parametrize("name", sorted(REAL))
def test_preset_written_as_config_json_reads_back_the_same(name):
    preset, size = REAL[name]
    model = resolve_model(ModelConfig(preset=preset, size=size))
    back = from_hf_config(json.loads(json.dumps(to_hf_config(model))))
    assert back == model


def test_deepseek_v3_quantization_config_is_the_blockwise_fp8_the_import_reads():
    assert block_size(_config("DeepSeek-V3")["quantization_config"], "DeepSeek-V3") == (128, 128)


def _set(cfg: dict, dotted: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    *path, key = dotted.split(".")
    target = cfg
    for part in path:
        target = target[part]
    target[key] = value
    return cfg


@pytest.mark.parametrize("name,field,value", [
    ("Qwen3-30B-A3B", "hidden_act", "gelu"),
    ("Qwen3-30B-A3B", "attention_bias", True),
    ("Qwen3-30B-A3B", "use_sliding_window", True),
    ("Qwen3-30B-A3B", "attention_dropout", 0.1),
    ("Qwen3-30B-A3B", "norm_topk_prob", False),
    ("Qwen3-30B-A3B", "decoder_sparse_step", 2),
    ("Qwen3-235B-A22B", "mlp_only_layers", [5]),
    ("DeepSeek-V3", "rope_scaling.truncate", False),
    ("DeepSeek-V3", "rope_scaling.attention_factor", 1.2),
    ("DeepSeek-V3", "rope_scaling.mscale", None),  # mscale_all_dim alone: transformers and megatron differ
    ("DeepSeek-V3", "moe_layer_freq", 2),
    ("DeepSeek-V3", "scoring_func", "softmax"),
    ("DeepSeek-V3", "topk_method", "greedy"),
    ("DeepSeek-R1-Distill-Qwen-7B", "use_mrope", True),
    ("DeepSeek-R1-Distill-Qwen-7B", "use_sliding_window", True),
    ("Llama-3.1-8B", "mlp_bias", True),
    ("Llama-3.1-8B", "pretraining_tp", 2),
    ("Llama-3.1-8B", "rope_scaling.high_freq_factor", 2.0),
])
def test_unrepresentable_fields_are_refused_by_name(name, field, value):
    with pytest.raises(BridgeError, match=field.split(".")[-1]):
        from_hf_config(_set(_config(name), field, value))
