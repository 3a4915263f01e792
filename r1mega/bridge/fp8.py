"""Blockwise FP8 (e4m3) weights with 128x128 scales, as in DeepSeek-V3's released checkpoints.

A linear weight ``W [out, in]`` becomes ``W_fp8 = W / s`` per 128x128 block (float8_e4m3fn) plus
``weight_scale_inv = s = amax(block) / 448`` of shape ``[ceil(out/128), ceil(in/128)]``; the original
is ``W_fp8.float() * s`` broadcast over each block. Embeddings, the LM head, norms and routers stay
in their dtype (like DeepSeek-V3 and vLLM's ``fp8`` block quantisation expect). The codec itself
lives in ``r1mega.kernels.fp8_blockwise`` (compiled op with a torch fallback).
"""

from __future__ import annotations

import re

import torch

from r1mega.kernels.fp8_blockwise import BLOCK, FP8, FP8_MAX, dequantize_blockwise, quantize_blockwise

__all__ = ["BLOCK", "FP8", "FP8_MAX", "dequantize_blockwise", "quantization_config", "quantize_blockwise",
           "quantize_bucket"]

_QUANTIZED = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|"
                        r"gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")


def quantize_bucket(bucket: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, t in bucket:
        if t.dim() == 2 and _QUANTIZED.search(name):
            q, s = quantize_blockwise(t)
            out += [(name, q), (name.removesuffix("weight") + "weight_scale_inv", s)]
        else:
            out.append((name, t))
    return out


def quantization_config() -> dict:
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [BLOCK, BLOCK]}
