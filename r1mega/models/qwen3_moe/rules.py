"""Qwen3-MoE tensor names: megatron <-> ``Qwen3MoeForCausalLM``."""

from r1mega.bridge.rules import COMMON, EXPERT, GQA, QK_NORM, Architecture, Direct, H, L, swiglu

ARCHITECTURE = Architecture(
    preset="qwen3_moe", model_type="qwen3_moe", hf_class="Qwen3MoeForCausalLM",
    rules=[*COMMON, *GQA, *QK_NORM,
           Direct(L + "mlp.router.weight", (H + "mlp.gate.weight",)),
           *swiglu(EXPERT, H + "mlp.experts.{expert}."),
           *swiglu(L + "mlp.", H + "mlp.")],  # dense layers (mlp_only_layers)
)
