"""config.json pieces every family shares: the base fields, RoPE scaling, and the refusals of values
the r1mega model cannot represent (each family's ``hf_config`` builds on these)."""

from __future__ import annotations

from r1mega.bridge.rules import Architecture, BridgeError
from r1mega.config.presets import YARN_DEFAULTS
from r1mega.config.schema import ModelConfig
from r1mega.models.family import Family

# megatron's llama3 RoPE scaling has these fixed (every published Llama 3.x uses them)
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def yarn_constants(model: ModelConfig) -> dict[str, float]:
    """The YaRN constants of ``model`` (megatron's names): its own, else :data:`YARN_DEFAULTS`."""
    own = {"beta_fast": model.yarn_beta_fast, "beta_slow": model.yarn_beta_slow, "mscale": model.yarn_mscale,
           "mscale_all_dim": model.yarn_mscale_all_dim}
    return {k: YARN_DEFAULTS[k] if v is None else float(v) for k, v in own.items()}


def rope_parameters(model: ModelConfig) -> dict:
    if model.rope_type == "llama3":
        return {"rope_type": "llama3", "rope_theta": float(model.rotary_base),
                "factor": float(model.rotary_scaling_factor), **LLAMA3_ROPE_FIXED,
                "original_max_position_embeddings": model.original_max_position_embeddings}
    if model.rope_type == "yarn":
        return {"rope_type": "yarn", "rope_theta": float(model.rotary_base), "factor": model.rotary_scaling_factor,
                "original_max_position_embeddings": model.original_max_position_embeddings, **yarn_constants(model)}
    return {"rope_type": "default", "rope_theta": float(model.rotary_base)}


def rope_from(hf: dict) -> dict:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    out = {"rotary_base": int(theta), "rope_type": "rope"}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "yarn":
        out.update(rope_type="yarn", rotary_scaling_factor=float(rope["factor"]),
                   original_max_position_embeddings=int(rope["original_max_position_embeddings"]), **_yarn_from(rope))
    elif kind == "llama3":
        differs = {k: rope.get(k) for k, v in LLAMA3_ROPE_FIXED.items() if rope.get(k) != v}
        if differs:
            raise BridgeError(f"llama3 rope scaling with {differs} is not supported: megatron's llama3 scaling "
                              f"fixes {LLAMA3_ROPE_FIXED} (as every published Llama 3.x)")
        out.update(rope_type="llama3", rotary_scaling_factor=float(rope["factor"]),
                   original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    elif kind not in ("default", None):
        raise BridgeError(f"rope type {kind!r} is not supported by the bridge (default, yarn or llama3)")
    return out


def _yarn_from(rope: dict) -> dict:
    """transformers' YaRN constants as megatron's. transformers scales cos/sin by
    ``m(mscale) / m(mscale_all_dim)`` only when both are set, else by ``m(1)``; megatron always by the
    ratio (``m(0) = 1``), so a lone ``mscale`` maps to 1 and a lone ``mscale_all_dim`` has no equivalent."""
    for key, ok in (("attention_factor", None), ("truncate", True)):
        if rope.get(key, ok) != ok:
            raise BridgeError(f"yarn rope scaling with rope_scaling.{key}={rope[key]!r} is not supported "
                              "(megatron's YaRN derives the attention factor and truncates the correction range)")
    mscale, all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if all_dim and not mscale:
        raise BridgeError(f"yarn rope scaling with rope_scaling.mscale_all_dim={all_dim} and no mscale is not "
                          "supported (megatron's YaRN scales cos/sin by m(mscale) / m(mscale_all_dim))")
    return dict(yarn_beta_fast=float(rope.get("beta_fast") or 32.0), yarn_beta_slow=float(rope.get("beta_slow") or 1.0),
                yarn_mscale=float(mscale) if mscale and all_dim else 1.0, yarn_mscale_all_dim=float(all_dim or 0.0))


def base_to_hf(model: ModelConfig) -> dict:
    return dict(
        vocab_size=model.vocab_size, hidden_size=model.hidden_size, num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads, rms_norm_eps=model.norm_epsilon,
        max_position_embeddings=model.max_position_embeddings, tie_word_embeddings=bool(model.tie_word_embeddings),
        initializer_range=model.init_method_std, hidden_act="silu", attention_bias=False,
        rope_parameters=rope_parameters(model), dtype="float32" if model.precision == "fp32" else "bfloat16",
    )


def moe_to_hf(model: ModelConfig) -> dict:
    return dict(base_to_hf(model), num_experts_per_tok=model.moe_router_topk)


# config.json fields with an effect on the computation, and the only values the r1mega model has
# (absent counts as allowed: transformers' defaults are these)
_REQUIRED_VALUES = {
    "hidden_act": ("silu",),
    "attention_dropout": (0, 0.0),
    "pretraining_tp": (1,),
    "use_sliding_window": (False,),
    "use_mrope": (False,),
    "mlp_bias": (False,),
    "moe_layer_freq": (1,),
}


def check_representable(hf: dict, allow_attention_bias: bool = False) -> None:
    for key, allowed in _REQUIRED_VALUES.items():
        if key in hf and hf[key] is not None and hf[key] not in allowed:
            raise BridgeError(f"config.json {key}={hf[key]!r} is not supported by the r1mega model "
                              f"(supported: {allowed[0]!r})")
    if hf.get("attention_bias") and not allow_attention_bias:
        raise BridgeError(f"config.json attention_bias=true is not supported for {hf.get('model_type')} "
                          "(the r1mega model has no attention biases)")


def base_from_hf(hf: dict, allow_attention_bias: bool = False) -> dict:
    check_representable(hf, allow_attention_bias=allow_attention_bias)
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"], norm_epsilon=hf["rms_norm_eps"],
        max_position_embeddings=hf["max_position_embeddings"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=hf.get("initializer_range", 0.02), **rope_from(hf),
    )


def moe_from_hf(hf: dict) -> dict:
    return dict(base_from_hf(hf), moe_router_topk=hf["num_experts_per_tok"])


def check_softmax_router(model: ModelConfig) -> None:
    if model.moe_router_score_function != "softmax" or model.moe_router_pre_softmax:
        raise BridgeError("this HF architecture routes with softmax over the top-k logits; the model uses "
                          f"score_function={model.moe_router_score_function!r}, "
                          f"pre_softmax={model.moe_router_pre_softmax}")


# ----------------------------------------------------------------------------- dense students


def check_dense(model: ModelConfig, family: str, qkv_bias: bool, qk_norm: bool) -> None:
    """HF's dense classes hard-wire these features per family; say which field to change."""
    if model.num_experts:
        raise BridgeError(f"{family} is a dense family; unset model.num_experts (={model.num_experts})")
    if bool(model.add_qkv_bias) != qkv_bias:
        raise BridgeError(f"{family} in HF {'always has' if qkv_bias else 'has no'} q/k/v biases: "
                          f"set model.add_qkv_bias={qkv_bias}")
    if bool(model.qk_layernorm) != qk_norm:
        raise BridgeError(f"{family} in HF {'always has' if qk_norm else 'has no'} q/k norms: "
                          f"set model.qk_layernorm={qk_norm}")
    if model.rope_type not in ("rope", "llama3", None) or (model.rope_type == "llama3" and family != "llama3"):
        raise BridgeError(f"{family}: rope_type={model.rope_type!r} is not supported by the bridge")


def dense_to_hf(model: ModelConfig) -> dict:
    return dict(base_to_hf(model), num_key_value_heads=model.num_query_groups, head_dim=model.kv_channels,
                intermediate_size=model.ffn_hidden_size)


def dense_from_hf(hf: dict, family: str, **fixed) -> dict:
    for flag in ("use_sliding_window", "attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise BridgeError(f"{family} with {flag}=true is not supported by the bridge")
    return dict(base_from_hf(hf), num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                kv_channels=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                ffn_hidden_size=hf["intermediate_size"], num_experts=None, multi_latent_attention=False, **fixed)


def dense_family(architecture: Architecture, qkv_bias: bool, qk_norm: bool, **written) -> Family:
    """A dense student family: HF hard-wires its q/k/v biases and q/k norms; ``written`` are further
    config.json keys its export states."""
    name = architecture.preset

    def to_hf(model: ModelConfig) -> dict:
        check_dense(model, name, qkv_bias=qkv_bias, qk_norm=qk_norm)
        return dict(dense_to_hf(model), **written)

    def from_hf(hf: dict) -> dict:
        return dense_from_hf(hf, name, add_qkv_bias=qkv_bias, qk_layernorm=qk_norm)

    return Family(architecture, to_hf, from_hf)
