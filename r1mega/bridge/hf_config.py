"""r1mega ``ModelConfig`` <-> Hugging Face ``config.json``, through each family's converter pair
(``r1mega/models/<family>/hf_config.py``, found by ``r1mega.models.registry``).

The r1mega ``ModelConfig`` is what builds the megatron ``TransformerConfig`` (``models.policy``), so
converting to and from it covers HF config <-> TransformerConfig. Reading refuses, by the field's
name, every config.json value the r1mega model cannot represent (another activation, biases, sliding
windows, other YaRN constants, ...), so a checkpoint is never loaded into a model that computes
something else. A config that equals a preset size field for field is given that size's name.
"""

from __future__ import annotations

from dataclasses import asdict, fields, replace

from r1mega.bridge.rules import BridgeError, Dims
from r1mega.config.presets import PRESETS, resolve_model
from r1mega.config.schema import ModelConfig
from r1mega.models.registry import family, family_for_model_type


def dims_of(model: ModelConfig) -> Dims:
    return Dims(vocab_size=model.vocab_size, num_attention_heads=model.num_attention_heads,
                num_query_groups=model.num_query_groups or model.num_attention_heads,
                head_dim=model.kv_channels or model.hidden_size // model.num_attention_heads,
                hidden_size=model.hidden_size, num_layers=model.num_layers,
                mtp_num_layers=model.mtp_num_layers or 0, num_experts=model.num_experts or 0)


def to_hf_config(model: ModelConfig) -> dict:
    """``config.json`` contents for a resolved r1mega model."""
    fam = family(model.preset)
    body = fam.to_hf(model)
    if (model.rotary_percent or 1.0) != 1.0 and "partial_rotary_factor" not in body:
        raise BridgeError(f"{model.preset} in HF rotates every dim of a head: unset model.rotary_percent "
                          f"(={model.rotary_percent})")
    return {"architectures": [fam.architecture.hf_class], "model_type": fam.architecture.model_type, **body}


# ModelConfig fields that are not architecture (a preset size does not fix them)
_NOT_ARCHITECTURE = ("preset", "size", "precision", "fp8_recipe", "seq_length", "seed", "moe_grouped_experts")


def matching_size(model: ModelConfig) -> str | None:
    """The preset size whose architecture equals ``model`` field for field, if there is one."""
    for size in PRESETS[model.preset]:
        ref = resolve_model(ModelConfig(preset=model.preset, size=size))
        if all(getattr(ref, f.name) == getattr(model, f.name) for f in fields(ModelConfig)
               if f.name not in _NOT_ARCHITECTURE):
            return size
    return None


def from_hf_config(hf: dict, precision: str = "fp32") -> ModelConfig:
    """A resolved r1mega ``ModelConfig`` for an HF ``config.json`` dict (every shape field explicit).

    Named after the preset size it equals (e.g. ``qwen3_moe`` / ``30b_a3b``), else ``tiny`` with every
    architecture field set from the config.
    """
    fam = family_for_model_type(hf.get("model_type", "?"))
    fields_ = fam.from_hf(hf)
    partial = (hf.get("rope_parameters") or hf.get("rope_scaling") or {}).get("partial_rotary_factor",
                                                                             hf.get("partial_rotary_factor", 1.0))
    if "rotary_percent" not in fields_ and float(partial) != 1.0:
        raise BridgeError(f"config.json partial_rotary_factor={partial} is not supported for {fam.name} (its HF "
                          "model rotates every dim of a head)")
    base = ModelConfig(preset=fam.name, size="tiny", precision=precision)
    model = resolve_model(replace(base, **fields_))
    return replace(model, size=matching_size(model) or model.size)


def model_config_dict(model: ModelConfig) -> dict:
    return asdict(model)
