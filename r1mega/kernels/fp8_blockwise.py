"""Blockwise FP8 (e4m3) quantise/dequantise with one scale per ``block x block`` tile.

``W [rows, cols]`` becomes ``q = W / s`` per tile (float8_e4m3fn, clamped to +-448) and
``scale_inv = s = amax(tile) / 448`` of shape ``[ceil(rows/block), ceil(cols/block)]``: the layout of
DeepSeek-V3's released weights and of vLLM's ``fp8`` block quantisation, used by the bridge when it
pushes FP8 weights. The compiled op (``csrc/``; C++ on CPU, CUDA on GPUs) runs when available; the
torch versions here are the fallback and the reference (both give identical bits).
"""

from __future__ import annotations

import torch

from r1mega.kernels.extension import ops_for

BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = w.shape
    pr, pc = -rows % block, -cols % block
    return torch.nn.functional.pad(w, (0, pc, 0, pr)) if pr or pc else w


def quantize_blockwise_torch(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    padded = _pad_to_blocks(w.float(), block)
    br, bc = padded.shape[0] // block, padded.shape[1] // block
    blocks = padded.reshape(br, block, bc, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(br * block, bc * block)[:rows, :cols].contiguous(), scale_inv


def dequantize_blockwise_torch(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = q.shape
    scales = scale_inv.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return (q.float() * scales).to(dtype)


def _check(w: torch.Tensor, block: int) -> None:
    if w.dim() != 2:
        raise ValueError(f"blockwise FP8 needs a 2-D tensor, got shape {tuple(w.shape)}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")


def quantize_blockwise(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn tensor like ``w``, float32 ``scale_inv`` [ceil(rows/block), ceil(cols/block)])."""
    _check(w, block)
    if ops_for(w.device):
        return torch.ops.r1mega.fp8_blockwise_quantize(w, block)
    return quantize_blockwise_torch(w, block)


def dequantize_blockwise(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    _check(q, block)
    if q.dtype != FP8:
        raise ValueError(f"expected a float8_e4m3fn tensor, got {q.dtype}")
    if ops_for(q.device):
        return torch.ops.r1mega.fp8_blockwise_dequantize(q, scale_inv, block, dtype)
    return dequantize_blockwise_torch(q, scale_inv, block, dtype)
