"""GLM-4-MoE config.json <-> ``ModelConfig``.

transformers' ``Glm4MoeForCausalLM`` rotates the first ``head_dim * partial_rotary_factor`` dims of each
head, half-split (``rotate_half``; 0.5 when the config does not say, as transformers and vLLM default it)
= megatron's ``rotary_percent`` with ``rotary_interleaved=False``. Its router is DeepSeek-V3's: sigmoid
scores plus ``e_score_correction_bias`` choose the experts, the chosen scores are renormalised and
scaled by ``routed_scaling_factor``; a group is scored by the sum of its top *two* experts, megatron's
by its top ``topk // topk_group``, so more than one group needs ``topk // topk_group == 2``. megatron
renormalises sigmoid weights only for top-k > 1, transformers always (``norm_topk_prob``), so top-1 and
``norm_topk_prob: false`` are refused.
"""

from __future__ import annotations

from r1mega.bridge.rules import BridgeError
from r1mega.config.schema import ModelConfig
from r1mega.models.family import Family
from r1mega.models.glm4_moe.rules import ARCHITECTURE
from r1mega.models.hf_common import base_from_hf, moe_to_hf

DEFAULT_PARTIAL_ROTARY = 0.5  # Glm4MoeConfig and vLLM's glm4_moe when config.json has no partial_rotary_factor


def _check_router(topk: int, groups: int, group_topk: int) -> None:
    """Names both spellings (config.json's, then the model's) of each field it refuses."""
    if topk < 2:
        raise BridgeError(f"glm4_moe with top-1 routing (num_experts_per_tok / moe_router_topk = {topk}) is not "
                          "supported: transformers renormalises the one weight to 1, megatron's sigmoid router "
                          "keeps the score")
    if groups > 1 and topk // group_topk != 2:
        raise BridgeError(f"glm4_moe with n_group={groups}, topk_group={group_topk}, top-{topk} (moe_router_num_groups"
                          " / moe_router_group_topk) is not supported: transformers scores a group by its top 2 "
                          "experts, megatron by its top topk // topk_group (keep that 2, or one group)")


def to_hf(model: ModelConfig) -> dict:
    if model.multi_latent_attention:
        raise BridgeError("glm4_moe has no multi-latent attention: set model.multi_latent_attention=false")
    if model.moe_router_score_function != "sigmoid" or not model.moe_router_enable_expert_bias:
        raise BridgeError("glm4_moe routes with sigmoid scores and an expert bias (e_score_correction_bias): set "
                          "moe_router_score_function=sigmoid, moe_router_enable_expert_bias=true")
    if model.rope_type not in ("rope", None):
        raise BridgeError(f"glm4_moe: rope_type={model.rope_type!r} is not supported by the bridge (plain rope)")
    groups, group_topk = model.moe_router_num_groups or 1, model.moe_router_group_topk or 1
    _check_router(model.moe_router_topk, groups, group_topk)
    shared = model.moe_shared_expert_intermediate_size or 0
    if not shared or shared % model.moe_ffn_hidden_size:
        raise BridgeError(f"glm4_moe always has shared experts of n x moe_ffn_hidden_size: "
                          f"moe_shared_expert_intermediate_size={shared} is not a positive multiple of "
                          f"{model.moe_ffn_hidden_size}")
    partial = float(model.rotary_percent or 1.0)
    out = dict(moe_to_hf(model), num_key_value_heads=model.num_query_groups, head_dim=model.kv_channels,
               intermediate_size=model.ffn_hidden_size, moe_intermediate_size=model.moe_ffn_hidden_size,
               n_routed_experts=model.num_experts, n_shared_experts=shared // model.moe_ffn_hidden_size,
               first_k_dense_replace=model.first_k_dense_layers or 0, n_group=groups, topk_group=group_topk,
               routed_scaling_factor=model.moe_router_topk_scaling_factor or 1.0, norm_topk_prob=True,
               attention_bias=bool(model.add_qkv_bias), use_qk_norm=bool(model.qk_layernorm),
               partial_rotary_factor=partial, num_nextn_predict_layers=model.mtp_num_layers or 0)
    out["rope_parameters"] = dict(out["rope_parameters"], partial_rotary_factor=partial)
    return out


def from_hf(hf: dict) -> dict:
    if not hf.get("norm_topk_prob", True):
        raise BridgeError("glm4_moe with norm_topk_prob=false is not supported (megatron's sigmoid router "
                          "renormalises the top-k weights)")
    if hf.get("topk_method", "noaux_tc") != "noaux_tc" or hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise BridgeError(f"glm4_moe with topk_method={hf.get('topk_method')!r}, scoring_func="
                          f"{hf.get('scoring_func')!r} is not supported (transformers routes noaux_tc, sigmoid)")
    if not hf.get("n_shared_experts", 1):
        raise BridgeError("glm4_moe with n_shared_experts=0 is not supported (transformers always builds the "
                          "shared expert)")
    groups, group_topk = hf.get("n_group") or 1, hf.get("topk_group") or 1
    _check_router(hf["num_experts_per_tok"], groups, group_topk)
    fields_ = base_from_hf(hf, allow_attention_bias=True)  # q/k/v biases (o_proj has none)
    if fields_["rope_type"] != "rope":
        raise BridgeError(f"glm4_moe with rope_scaling of type {fields_['rope_type']!r} is not supported "
                          "(the published models use plain rope)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    partial = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", DEFAULT_PARTIAL_ROTARY)))
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if not 0 < partial <= 1 or int(head_dim * partial) % 2:
        raise BridgeError(f"glm4_moe with partial_rotary_factor={partial} is not supported: it must give an even "
                          f"number of rotary dims of head_dim {head_dim}")
    moe = hf["moe_intermediate_size"]
    return dict(fields_, moe_router_topk=hf["num_experts_per_tok"], num_query_groups=hf["num_key_value_heads"],
                kv_channels=head_dim, rotary_percent=partial,
                ffn_hidden_size=hf["intermediate_size"], moe_ffn_hidden_size=moe, num_experts=hf["n_routed_experts"],
                moe_shared_expert_intermediate_size=hf.get("n_shared_experts", 1) * moe,
                first_k_dense_layers=hf.get("first_k_dense_replace", 1),
                moe_router_num_groups=groups, moe_router_group_topk=group_topk,
                moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                moe_router_score_function="sigmoid", moe_router_pre_softmax=False, moe_router_enable_expert_bias=True,
                add_qkv_bias=bool(hf.get("attention_bias", False)), qk_layernorm=bool(hf.get("use_qk_norm", False)),
                multi_latent_attention=False, mtp_num_layers=int(hf.get("num_nextn_predict_layers") or 0))


FAMILY = Family(ARCHITECTURE, to_hf, from_hf)
