"""DeepSeek-V3 (``DeepseekV3ForCausalLM``): multi-latent attention with q-LoRA and latent norms,
sigmoid router with expert bias (aux-loss free) and group-limited top-k, shared experts, leading
dense layers, multi-token prediction. Its megatron fixes (``mla_fix``, ``moe_fix``) are applied by
``r1mega.models`` on import, for every MLA / expert-bias model."""
