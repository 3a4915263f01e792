"""Blockwise FP8 (e4m3) quantise/dequantise with one scale per ``block x block`` tile.

A tile may also be rectangular (``(rows, cols)``, as ``quantization_config.weight_block_size`` may say).

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


def block_shape(block: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``(rows, cols)`` of one scale tile; an int is a square tile (``weight_block_size`` may be either)."""
    if isinstance(block, int):
        return block, block
    rows, cols = (int(b) for b in block)
    return rows, cols


def scale_shape(shape: tuple[int, int], block: int | tuple[int, int]) -> tuple[int, int]:
    br, bc = block_shape(block)
    return -(-shape[0] // br), -(-shape[1] // bc)


def _pad_to_blocks(w: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    rows, cols = w.shape
    pr, pc = -rows % br, -cols % bc
    return torch.nn.functional.pad(w, (0, pc, 0, pr)) if pr or pc else w


def quantize_blockwise_torch(w: torch.Tensor, block: int | tuple[int, int] = BLOCK
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    bh, bw = block_shape(block)
    padded = _pad_to_blocks(w.float(), bh, bw)
    br, bc = padded.shape[0] // bh, padded.shape[1] // bw
    blocks = padded.reshape(br, bh, bc, bw)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(br * bh, bc * bw)[:rows, :cols].contiguous(), scale_inv


def dequantize_blockwise_torch(q: torch.Tensor, scale_inv: torch.Tensor, block: int | tuple[int, int] = BLOCK,
                               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One row of tiles at a time, so the only full-size allocation is the output."""
    rows, cols = q.shape
    bh, bw = block_shape(block)
    out = torch.empty(rows, cols, dtype=dtype)
    scales = scale_inv.float()
    for i, r0 in enumerate(range(0, rows, bh)):
        part = _pad_to_blocks(q[r0:r0 + bh].float(), 1, bw)
        tiles = part.view(part.shape[0], -1, bw) * scales[i][None, :, None]
        out[r0:r0 + bh] = tiles.view(part.shape[0], -1)[:, :cols]
    return out


def _check(w: torch.Tensor, block: int | tuple[int, int]) -> None:
    if w.dim() != 2:
        raise ValueError(f"blockwise FP8 needs a 2-D tensor, got shape {tuple(w.shape)}")
    if min(block_shape(block)) < 1:
        raise ValueError(f"block must be >= 1, got {block}")


def quantize_blockwise(w: torch.Tensor, block: int | tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn tensor like ``w``, float32 ``scale_inv`` [ceil(rows/block), ceil(cols/block)]).

    The compiled op handles square tiles; a rectangular ``(rows, cols)`` tile runs the torch version.
    """
    _check(w, block)
    if isinstance(block, int) and ops_for(w.device):
        return torch.ops.r1mega.fp8_blockwise_quantize(w, block)
    return quantize_blockwise_torch(w, block)


def dequantize_blockwise(q: torch.Tensor, scale_inv: torch.Tensor, block: int | tuple[int, int] = BLOCK,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    _check(q, block)
    if q.dtype != FP8:
        raise ValueError(f"expected a float8_e4m3fn tensor, got {q.dtype}")
    if tuple(scale_inv.shape) != scale_shape(tuple(q.shape), block):
        raise ValueError(f"scale_inv has shape {tuple(scale_inv.shape)}, a {tuple(q.shape)} weight in "
                         f"{block_shape(block)} tiles needs {scale_shape(tuple(q.shape), block)}")
    if isinstance(block, int) and ops_for(q.device):
        return torch.ops.r1mega.fp8_blockwise_dequantize(q, scale_inv, block, dtype)
    return dequantize_blockwise_torch(q, scale_inv, block, dtype)
