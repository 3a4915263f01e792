"""Qwen2 / Qwen2.5 dense students (``Qwen2ForCausalLM``): GQA with q/k/v biases, SwiGLU, RoPE."""
