"""Blockwise FP8 (e4m3) weights with 128x128 scales, as in DeepSeek-V3's released checkpoints.

A linear weight ``W [out, in]`` becomes ``W_fp8 = W / s`` per 128x128 block (float8_e4m3fn) plus
``weight_scale_inv = s = amax(block) / 448`` of shape ``[ceil(out/128), ceil(in/128)]``; the original
is ``W_fp8.float() * s`` broadcast over each block. Embeddings, the LM head, norms and routers stay
in their dtype (like DeepSeek-V3 and vLLM's ``fp8`` block quantisation expect).
"""

from __future__ import annotations

import re

import torch

BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_QUANTIZED = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|"
                        r"gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")


def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = w.shape
    pr, pc = -rows % block, -cols % block
    return torch.nn.functional.pad(w, (0, pc, 0, pr)) if pr or pc else w


def quantize_blockwise(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv [ceil(rows/block), ceil(cols/block)])."""
    rows, cols = w.shape
    padded = _pad_to_blocks(w.float(), block)
    br, bc = padded.shape[0] // block, padded.shape[1] // block
    blocks = padded.reshape(br, block, bc, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(br * block, bc * block)[:rows, :cols].contiguous(), scale_inv


def dequantize_blockwise(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    rows, cols = q.shape
    scales = scale_inv.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return q.float() * scales


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
