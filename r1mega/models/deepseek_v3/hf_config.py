"""DeepSeek-V3 config.json <-> ``ModelConfig``; also Moonlight and Kimi-K2 (``model_type`` ``kimi_k2``),
the DeepSeek-V3 architecture with other sizes and router settings (a single group, q-LoRA or not).

``mla_to_hf`` / ``mla_from_hf`` hold what DeepSeek-V2 (``deepseek_v2``) shares: MLA, shared experts,
leading dense layers, routed scaling."""

from __future__ import annotations

from r1mega.bridge.rules import BridgeError
from r1mega.config.schema import ModelConfig
from r1mega.models.deepseek_v3.rules import ARCHITECTURE
from r1mega.models.family import Family
from r1mega.models.hf_common import moe_from_hf, moe_to_hf


def mla_to_hf(model: ModelConfig, family: str) -> dict:
    if not model.multi_latent_attention:
        raise BridgeError(f"{family} needs multi_latent_attention=True")
    if not model.qk_layernorm:
        raise BridgeError(f"{family} in HF normalises the MLA latents (q_a_layernorm, kv_a_layernorm); "
                          "the megatron model has no such norms: build it with qk_layernorm=True")
    shared = model.moe_shared_expert_intermediate_size or 0
    if shared % model.moe_ffn_hidden_size:
        raise BridgeError(f"shared expert size {shared} is not a multiple of moe_ffn_hidden_size")
    return dict(moe_to_hf(model), num_key_value_heads=model.num_attention_heads,
                intermediate_size=model.ffn_hidden_size, moe_intermediate_size=model.moe_ffn_hidden_size,
                n_routed_experts=model.num_experts, n_shared_experts=shared // model.moe_ffn_hidden_size,
                q_lora_rank=model.q_lora_rank or None, kv_lora_rank=model.kv_lora_rank,
                qk_nope_head_dim=model.qk_head_dim, qk_rope_head_dim=model.qk_pos_emb_head_dim,
                v_head_dim=model.v_head_dim, first_k_dense_replace=model.first_k_dense_layers or 0,
                n_group=model.moe_router_num_groups or 1, topk_group=model.moe_router_group_topk or 1,
                routed_scaling_factor=model.moe_router_topk_scaling_factor or 1.0)


def mla_from_hf(hf: dict) -> dict:
    moe = hf["moe_intermediate_size"]
    if hf.get("attention_bias"):
        raise BridgeError(f"{hf.get('model_type')} with attention_bias=true is not supported (MLA has no biases)")
    return dict(moe_from_hf(hf), num_query_groups=hf["num_attention_heads"],
                ffn_hidden_size=hf["intermediate_size"],
                moe_ffn_hidden_size=moe, num_experts=hf["n_routed_experts"],
                moe_shared_expert_intermediate_size=(hf.get("n_shared_experts") or 0) * moe or None,
                q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
                qk_head_dim=hf["qk_nope_head_dim"], qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
                v_head_dim=hf["v_head_dim"], kv_channels=hf["qk_nope_head_dim"],
                first_k_dense_layers=hf.get("first_k_dense_replace", 0),
                # one group (Moonlight, Kimi-K2): megatron's group-limited top-k is then plain top-k
                moe_router_num_groups=hf.get("n_group"), moe_router_group_topk=hf.get("topk_group"),
                moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)), qk_layernorm=True,
                multi_latent_attention=True)


def to_hf(model: ModelConfig) -> dict:
    if model.moe_router_score_function != "sigmoid" or not model.moe_router_enable_expert_bias:
        raise BridgeError("deepseek_v3 routes with sigmoid scores and an expert bias (e_score_correction_bias)")
    return dict(mla_to_hf(model, "deepseek_v3"), norm_topk_prob=True,
                rope_interleave=True, num_nextn_predict_layers=model.mtp_num_layers or 0,
                # transformers always routes DeepSeek-V3 this way; vLLM reads these keys (as in the released
                # config.json) and otherwise routes with softmax and has no slot for e_score_correction_bias
                topk_method="noaux_tc", scoring_func="sigmoid")


def from_hf(hf: dict) -> dict:
    if not hf.get("rope_interleave", True):
        raise BridgeError("deepseek_v3 with rope_interleave=false is not supported (megatron MLA interleaves)")
    if not hf.get("norm_topk_prob", True):
        raise BridgeError("deepseek_v3 with norm_topk_prob=false is not supported")
    if hf.get("topk_method", "noaux_tc") != "noaux_tc" or hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise BridgeError(f"deepseek_v3 with topk_method={hf.get('topk_method')!r}, scoring_func="
                          f"{hf.get('scoring_func')!r} is not supported (expects noaux_tc, sigmoid)")
    return dict(mla_from_hf(hf), moe_router_score_function="sigmoid", moe_router_pre_softmax=False,
                moe_router_enable_expert_bias=True, mtp_num_layers=int(hf.get("num_nextn_predict_layers") or 0))


# Kimi-K2's config.json says model_type "kimi_k2" (transformers has no such class; vLLM reads it as
# DeepSeek-V3's); export writes "deepseek_v3", which both read.
FAMILY = Family(ARCHITECTURE, to_hf, from_hf, reads_model_types=("kimi_k2",))
