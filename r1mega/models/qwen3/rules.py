"""Qwen3 tensor names: megatron <-> ``Qwen3ForCausalLM`` (q/k norms)."""

from r1mega.bridge.rules import COMMON, GQA, QK_NORM, Architecture, H, L, swiglu

ARCHITECTURE = Architecture(
    preset="qwen3", model_type="qwen3", hf_class="Qwen3ForCausalLM",
    rules=[*COMMON, *GQA, *QK_NORM, *swiglu(L + "mlp.", H + "mlp.")],
)
