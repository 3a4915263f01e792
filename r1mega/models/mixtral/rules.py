"""Mixtral tensor names: megatron <-> ``MixtralForCausalLM`` (experts ``w1``/``w3``/``w2``)."""

from r1mega.bridge.rules import COMMON, EXPERT, GQA, Architecture, Direct, H, L, swiglu

ARCHITECTURE = Architecture(
    preset="mixtral", model_type="mixtral", hf_class="MixtralForCausalLM",
    rules=[*COMMON, *GQA,
           Direct(L + "mlp.router.weight", (H + "block_sparse_moe.gate.weight",)),
           *swiglu(EXPERT, H + "block_sparse_moe.experts.{expert}.", "w1", "w3", "w2")],
)
