"""GLM-4.5 / GLM-4.5-Air / GLM-4.6 (``Glm4MoeForCausalLM``): GQA with q/k/v biases and optional per-head
q/k RMSNorm, rotary on the first half of each head's dims (half-split, = megatron ``rotary_percent``), a
sigmoid router with DeepSeek-V3's expert score-correction bias, one shared expert, leading dense layers
and a multi-token prediction layer (mapped as DeepSeek-V3's)."""
