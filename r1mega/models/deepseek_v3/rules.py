"""DeepSeek-V3 tensor names: megatron <-> ``DeepseekV3ForCausalLM``, MTP layers included."""

from r1mega.bridge.rules import COMMON, EXPERT, Architecture, Direct, H, L, swiglu

# MLA: megatron and HF both order q_up rows per head [nope, rope], kv_down rows [kv_latent, k_rope]
# and kv_up rows per head [k_nope, v]; the rope layout matches HF's ``rope_interleave=True``
# (megatron de-interleaves inside its MLA rope).
MLA = [
    Direct(L + "self_attention.linear_q_proj.weight", (H + "self_attn.q_proj.weight",)),
    Direct(L + "self_attention.linear_q_down_proj.weight", (H + "self_attn.q_a_proj.weight",)),
    Direct(L + "self_attention.linear_q_up_proj.weight", (H + "self_attn.q_b_proj.weight",)),
    Direct(L + "self_attention.q_layernorm.weight", (H + "self_attn.q_a_layernorm.weight",)),
    Direct(L + "self_attention.linear_kv_down_proj.weight", (H + "self_attn.kv_a_proj_with_mqa.weight",)),
    Direct(L + "self_attention.kv_layernorm.weight", (H + "self_attn.kv_a_layernorm.weight",)),
    Direct(L + "self_attention.linear_kv_up_proj.weight", (H + "self_attn.kv_b_proj.weight",)),
]
# routed experts, shared experts and the first_k_dense_replace dense layers
MOE = [
    Direct(L + "mlp.router.weight", (H + "mlp.gate.weight",)),
    *swiglu(EXPERT, H + "mlp.experts.{expert}."),
    *swiglu(L + "mlp.shared_experts.", H + "mlp.shared_experts."),
    *swiglu(L + "mlp.", H + "mlp."),
]
EXPERT_BIAS = [Direct(L + "mlp.router.expert_bias", (H + "mlp.gate.e_score_correction_bias",))]
MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
           "final_layernorm.weight": "shared_head.norm.weight"}
MTP_COPIES = {"embedding.word_embeddings.weight": "embed_tokens.weight",
              "output_layer.weight": "shared_head.head.weight"}

ARCHITECTURE = Architecture(
    preset="deepseek_v3", model_type="deepseek_v3", hf_class="DeepseekV3ForCausalLM",
    rules=[*COMMON, *MLA, *EXPERT_BIAS, *MOE], mtp_own=MTP_OWN, mtp_copies=MTP_COPIES,
)
