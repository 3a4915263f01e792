"""gpt-oss (``GptOssForCausalLM``: gpt-oss-20b, gpt-oss-120b), all through megatron-core's own fields.

- Attention: GQA with q/k/v/o biases, a learned per-head sink logit in the softmax denominator
  (megatron ``softmax_type='learnable'``, the ``softmax_offset`` parameter of core attention = HF
  ``self_attn.sinks``), sliding-window layers alternating with full ones (``window_size`` = HF
  ``sliding_window`` - 1 to the left, ``window_attn_skip_freq=2`` = ``layer_types`` sliding, full, ...).
  r1mega's local core attention (``models.local_layers.SDPAttention``) computes both; TE does natively.
- Experts: biased linears (``add_bias_linear``), gate/up clamped at ``swiglu_limit`` and
  ``act(gate) * (up + 1)`` with ``act = x * sigmoid(1.702 x)`` (megatron ``quick_gelu``,
  ``glu_linear_offset=1``, ``activation_func_clamp_value``); a biased router: softmax over the top-k logits.
- YaRN RoPE without rounding of the correction range (``truncate: false``).
- HF stores every expert of a layer in one tensor (``mlp.experts.gate_up_proj`` [E, H, 2I] with gate and
  up interleaved in its columns, ``down_proj`` [E, I, H], and their biases); the rules map them to
  megatron's per-expert ``linear_fc1`` / ``linear_fc2`` (``bridge.rules.PackedExperts``).
- The published checkpoints hold the expert weights as MXFP4 (``*_blocks`` / ``*_scales``,
  ``quantization_config.quant_method: mxfp4``): r1mega refuses them by name (no silent cast). Fix:
  dequantise once with transformers (``Mxfp4Config(dequantize=True)`` then ``save_pretrained``) or use a
  BF16 copy, then ``r1mega convert from-hf``.
"""
