"""r1mega ``ModelConfig`` <-> Hugging Face ``config.json``, one converter pair per architecture.

The r1mega ``ModelConfig`` is what builds the megatron ``TransformerConfig`` (``models.policy``), so
converting to and from it covers HF config <-> TransformerConfig. Reading refuses, by the field's
name, every config.json value the r1mega model cannot represent (another activation, biases, sliding
windows, other YaRN constants, ...), so a checkpoint is never loaded into a model that computes
something else. A config that equals a preset size field for field is given that size's name.
"""

from __future__ import annotations

from dataclasses import asdict, fields, replace

from r1mega.bridge.rules import BridgeError, Dims, architecture, architecture_for_model_type
from r1mega.config.presets import PRESETS, YARN_FIXED, resolve_model
from r1mega.config.schema import ModelConfig


def dims_of(model: ModelConfig) -> Dims:
    return Dims(vocab_size=model.vocab_size, num_attention_heads=model.num_attention_heads,
                num_query_groups=model.num_query_groups or model.num_attention_heads,
                head_dim=model.kv_channels or model.hidden_size // model.num_attention_heads,
                hidden_size=model.hidden_size, num_layers=model.num_layers,
                mtp_num_layers=model.mtp_num_layers or 0)


# megatron's llama3 RoPE scaling has these fixed (every published Llama 3.x uses them)
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope_parameters(model: ModelConfig) -> dict:
    if model.rope_type == "llama3":
        return {"rope_type": "llama3", "rope_theta": float(model.rotary_base),
                "factor": float(model.rotary_scaling_factor), **LLAMA3_ROPE_FIXED,
                "original_max_position_embeddings": model.original_max_position_embeddings}
    if model.rope_type == "yarn":
        return {"rope_type": "yarn", "rope_theta": float(model.rotary_base), "factor": model.rotary_scaling_factor,
                "original_max_position_embeddings": model.original_max_position_embeddings, **YARN_FIXED}
    return {"rope_type": "default", "rope_theta": float(model.rotary_base)}


def _rope_from(hf: dict) -> dict:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    out = {"rotary_base": int(theta), "rope_type": "rope"}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "yarn":
        differs = {k: rope.get(k) for k, v in YARN_FIXED.items() if rope.get(k) is None or float(rope[k]) != v}
        if differs:
            named = ", ".join(f"rope_scaling.{k}={v}" for k, v in differs.items())
            raise BridgeError(f"yarn rope scaling with {named} "
                              f"is not supported: r1mega's MLA uses YaRN with {YARN_FIXED} (DeepSeek-V3's)")
        out.update(rope_type="yarn", rotary_scaling_factor=float(rope["factor"]),
                   original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
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


def _base_to_hf(model: ModelConfig) -> dict:
    return dict(
        vocab_size=model.vocab_size, hidden_size=model.hidden_size, num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads, rms_norm_eps=model.norm_epsilon,
        max_position_embeddings=model.max_position_embeddings, tie_word_embeddings=bool(model.tie_word_embeddings),
        initializer_range=model.init_method_std, hidden_act="silu", attention_bias=False,
        rope_parameters=_rope_parameters(model), dtype="float32" if model.precision == "fp32" else "bfloat16",
    )


def _common_to_hf(model: ModelConfig) -> dict:
    return dict(_base_to_hf(model), num_experts_per_tok=model.moe_router_topk)


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


def _check_representable(hf: dict, allow_attention_bias: bool = False) -> None:
    for key, allowed in _REQUIRED_VALUES.items():
        if key in hf and hf[key] is not None and hf[key] not in allowed:
            raise BridgeError(f"config.json {key}={hf[key]!r} is not supported by the r1mega model "
                              f"(supported: {allowed[0]!r})")
    if hf.get("attention_bias") and not allow_attention_bias:
        raise BridgeError(f"config.json attention_bias=true is not supported for {hf.get('model_type')} "
                          "(the r1mega model has no attention biases)")


def _base_from_hf(hf: dict) -> dict:
    _check_representable(hf, allow_attention_bias=hf.get("model_type") == "qwen2")
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"], norm_epsilon=hf["rms_norm_eps"],
        max_position_embeddings=hf["max_position_embeddings"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=hf.get("initializer_range", 0.02), **_rope_from(hf),
    )


def _common_from_hf(hf: dict) -> dict:
    return dict(_base_from_hf(hf), moe_router_topk=hf["num_experts_per_tok"])


def _check_softmax_router(model: ModelConfig) -> None:
    if model.moe_router_score_function != "softmax" or model.moe_router_pre_softmax:
        raise BridgeError("this HF architecture routes with softmax over the top-k logits; the model uses "
                          f"score_function={model.moe_router_score_function!r}, "
                          f"pre_softmax={model.moe_router_pre_softmax}")


def _qwen3_to_hf(model: ModelConfig) -> dict:
    _check_softmax_router(model)
    if model.moe_shared_expert_intermediate_size:
        raise BridgeError("qwen3_moe has no shared experts in HF; unset moe_shared_expert_intermediate_size")
    first_dense = model.first_k_dense_layers or 0
    return dict(_common_to_hf(model), num_key_value_heads=model.num_query_groups, head_dim=model.kv_channels,
                intermediate_size=model.ffn_hidden_size, moe_intermediate_size=model.moe_ffn_hidden_size,
                num_experts=model.num_experts, norm_topk_prob=True, decoder_sparse_step=1,
                mlp_only_layers=list(range(first_dense)), router_aux_loss_coef=model.moe_aux_loss_coeff or 0.0,
                use_qk_norm=True)


def _qwen3_from_hf(hf: dict) -> dict:
    if not hf.get("norm_topk_prob", False):
        raise BridgeError("qwen3_moe with norm_topk_prob=false is not supported (megatron renormalises top-k)")
    if hf.get("decoder_sparse_step", 1) != 1:
        raise BridgeError("qwen3_moe decoder_sparse_step != 1 is not supported")
    dense = sorted(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise BridgeError(f"qwen3_moe mlp_only_layers={dense}: only the first k layers may be dense")
    return dict(_common_from_hf(hf), num_query_groups=hf["num_key_value_heads"],
                kv_channels=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                ffn_hidden_size=hf["intermediate_size"], moe_ffn_hidden_size=hf["moe_intermediate_size"],
                num_experts=hf.get("num_experts") or hf["num_local_experts"], qk_layernorm=True,
                first_k_dense_layers=len(dense),
                moe_router_score_function="softmax", moe_router_pre_softmax=False,
                multi_latent_attention=False)


def _mixtral_to_hf(model: ModelConfig) -> dict:
    _check_softmax_router(model)
    if model.qk_layernorm or (model.first_k_dense_layers or 0) or model.moe_shared_expert_intermediate_size:
        raise BridgeError("mixtral has no qk-norm, dense layers or shared experts in HF")
    return dict(_common_to_hf(model), num_key_value_heads=model.num_query_groups, head_dim=model.kv_channels,
                intermediate_size=model.moe_ffn_hidden_size, num_local_experts=model.num_experts,
                router_aux_loss_coef=model.moe_aux_loss_coeff or 0.0, sliding_window=None)


def _mixtral_from_hf(hf: dict) -> dict:
    if hf.get("sliding_window"):
        raise BridgeError("mixtral with sliding_window is not supported")
    return dict(_common_from_hf(hf), num_query_groups=hf["num_key_value_heads"],
                kv_channels=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                ffn_hidden_size=hf["intermediate_size"], moe_ffn_hidden_size=hf["intermediate_size"],
                num_experts=hf["num_local_experts"], qk_layernorm=False, first_k_dense_layers=0,
                moe_router_score_function="softmax", moe_router_pre_softmax=False,
                multi_latent_attention=False)


def _deepseek_to_hf(model: ModelConfig) -> dict:
    if not model.multi_latent_attention:
        raise BridgeError("deepseek_v3 needs multi_latent_attention=True")
    if not model.qk_layernorm:
        raise BridgeError("deepseek_v3 in HF normalises the MLA latents (q_a_layernorm, kv_a_layernorm); "
                          "the megatron model has no such norms: build it with qk_layernorm=True")
    shared = model.moe_shared_expert_intermediate_size or 0
    if shared % model.moe_ffn_hidden_size:
        raise BridgeError(f"shared expert size {shared} is not a multiple of moe_ffn_hidden_size")
    if model.moe_router_score_function != "sigmoid":
        raise BridgeError("deepseek_v3 routes with sigmoid scores")
    return dict(_common_to_hf(model), num_key_value_heads=model.num_attention_heads,
                intermediate_size=model.ffn_hidden_size, moe_intermediate_size=model.moe_ffn_hidden_size,
                n_routed_experts=model.num_experts, n_shared_experts=shared // model.moe_ffn_hidden_size,
                q_lora_rank=model.q_lora_rank, kv_lora_rank=model.kv_lora_rank,
                qk_nope_head_dim=model.qk_head_dim, qk_rope_head_dim=model.qk_pos_emb_head_dim,
                v_head_dim=model.v_head_dim, first_k_dense_replace=model.first_k_dense_layers or 0,
                n_group=model.moe_router_num_groups or 1, topk_group=model.moe_router_group_topk or 1,
                routed_scaling_factor=model.moe_router_topk_scaling_factor or 1.0, norm_topk_prob=True,
                rope_interleave=True, num_nextn_predict_layers=model.mtp_num_layers or 0,
                # transformers always routes DeepSeek-V3 this way; vLLM reads these keys (as in the released
                # config.json) and otherwise routes with softmax and has no slot for e_score_correction_bias
                topk_method="noaux_tc", scoring_func="sigmoid")


def _deepseek_from_hf(hf: dict) -> dict:
    if hf.get("q_lora_rank") is None:
        raise BridgeError("deepseek_v3 without q_lora_rank is not supported yet")
    if not hf.get("rope_interleave", True):
        raise BridgeError("deepseek_v3 with rope_interleave=false is not supported (megatron MLA interleaves)")
    if not hf.get("norm_topk_prob", True):
        raise BridgeError("deepseek_v3 with norm_topk_prob=false is not supported")
    if hf.get("topk_method", "noaux_tc") != "noaux_tc" or hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise BridgeError(f"deepseek_v3 with topk_method={hf.get('topk_method')!r}, scoring_func="
                          f"{hf.get('scoring_func')!r} is not supported (expects noaux_tc, sigmoid)")
    moe = hf["moe_intermediate_size"]
    return dict(_common_from_hf(hf), num_query_groups=hf["num_attention_heads"],
                ffn_hidden_size=hf["intermediate_size"],
                moe_ffn_hidden_size=moe, num_experts=hf["n_routed_experts"],
                moe_shared_expert_intermediate_size=(hf.get("n_shared_experts") or 0) * moe or None,
                q_lora_rank=hf["q_lora_rank"], kv_lora_rank=hf["kv_lora_rank"], qk_head_dim=hf["qk_nope_head_dim"],
                qk_pos_emb_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
                kv_channels=hf["qk_nope_head_dim"], first_k_dense_layers=hf.get("first_k_dense_replace", 0),
                moe_router_num_groups=hf.get("n_group"), moe_router_group_topk=hf.get("topk_group"),
                moe_router_topk_scaling_factor=hf.get("routed_scaling_factor", 1.0), qk_layernorm=True,
                multi_latent_attention=True, moe_router_score_function="sigmoid",
                moe_router_enable_expert_bias=True, mtp_num_layers=int(hf.get("num_nextn_predict_layers") or 0))


# ----------------------------------------------------------------------------- dense students


def _check_dense(model: ModelConfig, family: str, qkv_bias: bool, qk_norm: bool) -> None:
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


def _dense_to_hf(model: ModelConfig) -> dict:
    return dict(_base_to_hf(model), num_key_value_heads=model.num_query_groups, head_dim=model.kv_channels,
                intermediate_size=model.ffn_hidden_size)


def _dense_from_hf(hf: dict, family: str, **fixed) -> dict:
    for flag in ("use_sliding_window", "attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise BridgeError(f"{family} with {flag}=true is not supported by the bridge")
    return dict(_base_from_hf(hf), num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                kv_channels=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                ffn_hidden_size=hf["intermediate_size"], num_experts=None, multi_latent_attention=False, **fixed)


def _qwen2_to_hf(model: ModelConfig) -> dict:
    _check_dense(model, "qwen2", qkv_bias=True, qk_norm=False)
    return dict(_dense_to_hf(model), use_sliding_window=False)


def _qwen3_dense_to_hf(model: ModelConfig) -> dict:
    _check_dense(model, "qwen3", qkv_bias=False, qk_norm=True)
    return dict(_dense_to_hf(model), use_sliding_window=False)


def _llama3_to_hf(model: ModelConfig) -> dict:
    _check_dense(model, "llama3", qkv_bias=False, qk_norm=False)
    return dict(_dense_to_hf(model), mlp_bias=False)


CONVERTERS = {
    "qwen2": (_qwen2_to_hf, lambda hf: _dense_from_hf(hf, "qwen2", add_qkv_bias=True, qk_layernorm=False)),
    "qwen3": (_qwen3_dense_to_hf, lambda hf: _dense_from_hf(hf, "qwen3", add_qkv_bias=False, qk_layernorm=True)),
    "llama3": (_llama3_to_hf, lambda hf: _dense_from_hf(hf, "llama3", add_qkv_bias=False, qk_layernorm=False)),
    "qwen3_moe": (_qwen3_to_hf, _qwen3_from_hf),
    "mixtral": (_mixtral_to_hf, _mixtral_from_hf),
    "deepseek_v3": (_deepseek_to_hf, _deepseek_from_hf),
}


def to_hf_config(model: ModelConfig) -> dict:
    """``config.json`` contents for a resolved r1mega model."""
    arch = architecture(model.preset)
    body = CONVERTERS[model.preset][0](model)
    return {"architectures": [arch.hf_class], "model_type": arch.model_type, **body}


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
    arch = architecture_for_model_type(hf.get("model_type", "?"))
    fields_ = CONVERTERS[arch.preset][1](hf)
    base = ModelConfig(preset=arch.preset, size="tiny", precision=precision)
    model = resolve_model(replace(base, **fields_))
    return replace(model, size=matching_size(model) or model.size)


def model_config_dict(model: ModelConfig) -> dict:
    return asdict(model)
