"""gpt-oss config.json <-> ``ModelConfig``.

Every value the r1mega model cannot represent is refused by name: a ``layer_types`` pattern other than
alternating sliding / full attention from layer 0 (megatron's ``window_attn_skip_freq``), another
``swiglu_alpha`` (megatron's ``quick_gelu`` is fixed at 1.702), no attention biases, another activation.
"""

from __future__ import annotations

from r1mega.bridge.rules import BridgeError
from r1mega.config.schema import ModelConfig
from r1mega.models.family import Family
from r1mega.models.gpt_oss.rules import ARCHITECTURE
from r1mega.models.hf_common import check_softmax_router, moe_from_hf, moe_to_hf

SWIGLU_ALPHA = 1.702  # megatron's quick_gelu: x * sigmoid(1.702 x)


def _layer_types(num_layers: int, skip_freq: int) -> list[str]:
    """HF layer_types for megatron's window_attn_skip_freq (1-based: every skip_freq-th layer is full)."""
    return ["full_attention" if (i + 1) % skip_freq == 0 else "sliding_attention" for i in range(num_layers)]


def to_hf(model: ModelConfig) -> dict:
    check_softmax_router(model)
    wanted = dict(add_bias_linear=True, softmax_type="learnable", activation="quick_gelu", glu_linear_offset=1.0,
                  qk_layernorm=False, first_k_dense_layers=0, moe_shared_expert_intermediate_size=None,
                  moe_router_enable_expert_bias=False)
    off = {k: getattr(model, k) for k, v in wanted.items() if (getattr(model, k) or None) != (v or None)}
    if off:
        raise BridgeError(f"gpt_oss in HF has {wanted}; the model sets {off}")
    if not model.window_size or not model.window_attn_skip_freq:
        raise BridgeError("gpt_oss in HF alternates sliding-window and full attention: set model.window_size "
                          "and model.window_attn_skip_freq")
    if model.rope_type != "yarn":
        raise BridgeError(f"gpt_oss: rope_type={model.rope_type!r} is not supported by the bridge (yarn)")
    rope = {"rope_type": "yarn", "rope_theta": float(model.rotary_base), "factor": float(model.rotary_scaling_factor),
            "original_max_position_embeddings": model.original_max_position_embeddings,
            "beta_fast": float(model.yarn_beta_fast), "beta_slow": float(model.yarn_beta_slow),
            "truncate": model.yarn_truncate is not False}
    return dict(moe_to_hf(model), num_key_value_heads=model.num_query_groups, head_dim=model.kv_channels,
                intermediate_size=model.moe_ffn_hidden_size, num_local_experts=model.num_experts,
                router_aux_loss_coef=model.moe_aux_loss_coeff or 0.0, attention_bias=True,
                sliding_window=model.window_size,
                layer_types=_layer_types(model.num_layers, model.window_attn_skip_freq),
                swiglu_limit=model.activation_func_clamp_value, rope_parameters=rope)


def from_hf(hf: dict) -> dict:
    if not hf.get("attention_bias", True):
        raise BridgeError("gpt_oss with attention_bias=false is not supported (the r1mega model has biases on "
                          "every linear layer, add_bias_linear)")
    alpha = hf.get("swiglu_alpha", SWIGLU_ALPHA)
    if alpha != SWIGLU_ALPHA:
        raise BridgeError(f"gpt_oss with swiglu_alpha={alpha} is not supported: megatron's quick_gelu gate is "
                          f"x * sigmoid({SWIGLU_ALPHA} x)")
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or _layer_types(n, 2)
    window = hf.get("sliding_window")
    if types != _layer_types(n, 2) or not window:
        raise BridgeError(f"gpt_oss layer_types={types} with sliding_window={window} is not supported: r1mega "
                          "maps sliding_attention, full_attention, ... from layer 0 (megatron window_attn_skip_freq=2) "
                          "with a sliding_window")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    truncate = rope.pop("truncate", True)
    if rope.get("rope_type", rope.get("type")) != "yarn":
        raise BridgeError(f"gpt_oss with rope type {rope.get('rope_type')!r} is not supported (yarn)")
    fields = moe_from_hf({**hf, "rope_parameters": rope, "rope_scaling": None,
                          "attention_bias": False})  # the biases are mapped here, not refused
    limit = hf.get("swiglu_limit")
    return dict(fields, yarn_truncate=bool(truncate), num_query_groups=hf["num_key_value_heads"],
                kv_channels=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                ffn_hidden_size=hf["intermediate_size"], moe_ffn_hidden_size=hf["intermediate_size"],
                num_experts=hf["num_local_experts"], qk_layernorm=False, first_k_dense_layers=0,
                moe_router_score_function="softmax", moe_router_pre_softmax=False, multi_latent_attention=False,
                moe_aux_loss_coeff=hf.get("router_aux_loss_coef", 0.0), add_bias_linear=True,
                softmax_type="learnable", window_size=window, window_attn_skip_freq=2, activation="quick_gelu",
                glu_linear_offset=1.0, activation_func_clamp_value=None if limit is None else float(limit))


FAMILY = Family(ARCHITECTURE, to_hf, from_hf)
