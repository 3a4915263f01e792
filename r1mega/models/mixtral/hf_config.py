"""Mixtral config.json <-> ``ModelConfig``."""

from __future__ import annotations

from r1mega.bridge.rules import BridgeError
from r1mega.config.schema import ModelConfig
from r1mega.models.family import Family
from r1mega.models.hf_common import check_softmax_router, moe_from_hf, moe_to_hf
from r1mega.models.mixtral.rules import ARCHITECTURE


def to_hf(model: ModelConfig) -> dict:
    check_softmax_router(model)
    if model.qk_layernorm or (model.first_k_dense_layers or 0) or model.moe_shared_expert_intermediate_size:
        raise BridgeError("mixtral has no qk-norm, dense layers or shared experts in HF")
    return dict(moe_to_hf(model), num_key_value_heads=model.num_query_groups, head_dim=model.kv_channels,
                intermediate_size=model.moe_ffn_hidden_size, num_local_experts=model.num_experts,
                router_aux_loss_coef=model.moe_aux_loss_coeff or 0.0, sliding_window=None)


def from_hf(hf: dict) -> dict:
    if hf.get("sliding_window"):
        raise BridgeError("mixtral with sliding_window is not supported")
    return dict(moe_from_hf(hf), num_query_groups=hf["num_key_value_heads"],
                kv_channels=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                ffn_hidden_size=hf["intermediate_size"], moe_ffn_hidden_size=hf["intermediate_size"],
                num_experts=hf["num_local_experts"], qk_layernorm=False, first_k_dense_layers=0,
                moe_router_score_function="softmax", moe_router_pre_softmax=False,
                multi_latent_attention=False)


FAMILY = Family(ARCHITECTURE, to_hf, from_hf)
