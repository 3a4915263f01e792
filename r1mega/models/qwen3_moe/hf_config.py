"""Qwen3-MoE config.json <-> ``ModelConfig``."""

from __future__ import annotations

from r1mega.bridge.rules import BridgeError
from r1mega.config.schema import ModelConfig
from r1mega.models.family import Family
from r1mega.models.hf_common import check_softmax_router, moe_from_hf, moe_to_hf
from r1mega.models.qwen3_moe.rules import ARCHITECTURE


def to_hf(model: ModelConfig) -> dict:
    check_softmax_router(model)
    if model.moe_shared_expert_intermediate_size:
        raise BridgeError("qwen3_moe has no shared experts in HF; unset moe_shared_expert_intermediate_size")
    first_dense = model.first_k_dense_layers or 0
    return dict(moe_to_hf(model), num_key_value_heads=model.num_query_groups, head_dim=model.kv_channels,
                intermediate_size=model.ffn_hidden_size, moe_intermediate_size=model.moe_ffn_hidden_size,
                num_experts=model.num_experts, norm_topk_prob=True, decoder_sparse_step=1,
                mlp_only_layers=list(range(first_dense)), router_aux_loss_coef=model.moe_aux_loss_coeff or 0.0,
                use_qk_norm=True)


def from_hf(hf: dict) -> dict:
    if not hf.get("norm_topk_prob", False):
        raise BridgeError("qwen3_moe with norm_topk_prob=false is not supported (megatron renormalises top-k)")
    if hf.get("decoder_sparse_step", 1) != 1:
        raise BridgeError("qwen3_moe decoder_sparse_step != 1 is not supported")
    dense = sorted(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise BridgeError(f"qwen3_moe mlp_only_layers={dense}: only the first k layers may be dense")
    return dict(moe_from_hf(hf), num_query_groups=hf["num_key_value_heads"],
                kv_channels=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                ffn_hidden_size=hf["intermediate_size"], moe_ffn_hidden_size=hf["moe_intermediate_size"],
                num_experts=hf.get("num_experts") or hf["num_local_experts"], qk_layernorm=True,
                first_k_dense_layers=len(dense),
                moe_router_score_function="softmax", moe_router_pre_softmax=False,
                multi_latent_attention=False)


FAMILY = Family(ARCHITECTURE, to_hf, from_hf)
