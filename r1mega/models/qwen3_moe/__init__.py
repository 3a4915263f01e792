"""Qwen3-MoE (``Qwen3MoeForCausalLM``): GQA with per-head q/k RMSNorm, softmax top-k router with
renormalised weights, no shared experts; optional leading dense layers (``mlp_only_layers``)."""
