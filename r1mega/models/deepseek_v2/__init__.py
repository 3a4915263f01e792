"""DeepSeek-V2 (``DeepseekV2ForCausalLM``): multi-latent attention (V2-Lite without q-LoRA), a softmax
router over all experts whose top-k weights are not renormalised, shared experts, leading dense layers.
V2-Lite is the small MLA model; DeepSeek-V2 (236B) routes group-limited by each group's *largest*
score, which megatron's group-limited routing (sum of the top scores) does not compute: refused."""
