"""Qwen2 tensor names: megatron <-> ``Qwen2ForCausalLM`` (q/k/v biases)."""

from r1mega.bridge.rules import COMMON, GQA, QKV_BIAS, Architecture, H, L, swiglu

ARCHITECTURE = Architecture(
    preset="qwen2", model_type="qwen2", hf_class="Qwen2ForCausalLM",
    rules=[*COMMON, *GQA, *QKV_BIAS, *swiglu(L + "mlp.", H + "mlp.")],
)
