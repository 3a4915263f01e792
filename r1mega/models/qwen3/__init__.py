"""Qwen3 dense students (``Qwen3ForCausalLM``): GQA with per-head q/k RMSNorm, SwiGLU, RoPE."""
