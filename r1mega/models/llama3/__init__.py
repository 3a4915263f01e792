"""Llama 3.x dense students (``LlamaForCausalLM``): GQA, SwiGLU, llama3 RoPE frequency scaling."""
