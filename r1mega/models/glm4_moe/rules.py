"""GLM-4-MoE tensor names: megatron <-> ``Glm4MoeForCausalLM`` (MTP layers as DeepSeek-V3's)."""

from r1mega.bridge.rules import COMMON, GQA, QK_NORM, QKV_BIAS, Architecture
from r1mega.models.deepseek_v3.rules import EXPERT_BIAS, MOE, MTP_COPIES, MTP_OWN

# GQA with q/k/v biases and (GLM-4.5, GLM-4.6) q/k norms; DeepSeek-V3's router, experts, shared expert and
# dense-layer names, and its MTP layer layout (enorm, hnorm, eh_proj, shared_head, the copies of the
# embedding and output head). GLM-4.5's MTP layer has those copies, GLM-4.6's has none (vLLM's glm4_moe_mtp
# then reads the main model's): import takes either, export writes the copies (both loaders read them).
ARCHITECTURE = Architecture(
    preset="glm4_moe", model_type="glm4_moe", hf_class="Glm4MoeForCausalLM",
    rules=[*COMMON, *GQA, *QKV_BIAS, *QK_NORM, *EXPERT_BIAS, *MOE], mtp_own=MTP_OWN, mtp_copies=MTP_COPIES,
    mtp_copies_optional=True,
)
