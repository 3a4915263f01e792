"""gpt-oss tensor names: megatron <-> ``GptOssForCausalLM`` (on-disk names, experts packed per layer)."""

from r1mega.bridge.rules import (
    COMMON,
    EXPERT,
    GQA,
    QKV_BIAS,
    Architecture,
    Direct,
    H,
    InterleavedGateUp,
    L,
    PackedExperts,
    Transposed,
)

E = H + "mlp.experts.{expert}."  # one expert's slice of the packed tensors (see PackedExperts)

ARCHITECTURE = Architecture(
    preset="gpt_oss", model_type="gpt_oss", hf_class="GptOssForCausalLM",
    rules=[*COMMON, *GQA, *QKV_BIAS,
           Direct(L + "self_attention.linear_proj.bias", (H + "self_attn.o_proj.bias",)),
           Direct(L + "self_attention.core_attention.softmax_offset", (H + "self_attn.sinks",)),
           Direct(L + "mlp.router.weight", (H + "mlp.router.weight",)),
           Direct(L + "mlp.router.bias", (H + "mlp.router.bias",)),
           InterleavedGateUp(EXPERT + "linear_fc1.weight", (E + "gate_up_proj",)),
           InterleavedGateUp(EXPERT + "linear_fc1.bias", (E + "gate_up_proj_bias",)),
           Transposed(EXPERT + "linear_fc2.weight", (E + "down_proj",)),
           Direct(EXPERT + "linear_fc2.bias", (E + "down_proj_bias",))],
    packed=tuple(PackedExperts(E + n, H + "mlp.experts." + n)
                 for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")),
)
