"""Llama tensor names: megatron <-> ``LlamaForCausalLM``."""

from r1mega.bridge.rules import COMMON, GQA, Architecture, H, L, swiglu

ARCHITECTURE = Architecture(
    preset="llama3", model_type="llama", hf_class="LlamaForCausalLM",
    rules=[*COMMON, *GQA, *swiglu(L + "mlp.", H + "mlp.")],
)
