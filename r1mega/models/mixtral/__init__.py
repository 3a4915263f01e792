"""Mixtral (``MixtralForCausalLM``): GQA, softmax top-k router, every layer MoE, no qk-norm."""
