"""Blockwise FP8 (e4m3) weights with 128x128 scales, as in DeepSeek-V3's released checkpoints.

A linear weight ``W [out, in]`` becomes ``W_fp8 = W / s`` per 128x128 block (float8_e4m3fn) plus
``weight_scale_inv = s = amax(block) / 448`` of shape ``[ceil(out/128), ceil(in/128)]``; the original
is ``W_fp8.float() * s`` broadcast over each block. Embeddings, the LM head, norms and routers stay
in their dtype (like DeepSeek-V3 and vLLM's ``fp8`` block quantisation expect). The codec itself
lives in ``r1mega.kernels.fp8_blockwise`` (compiled op with a torch fallback).

Reading (``block_size``): the tile comes from ``quantization_config.weight_block_size`` (any
``[rows, cols]``); only this blockwise e4m3 scheme with ``*_scale_inv`` tensors is understood, and
any other quantisation is refused by name, never loaded as if it were plain weights.

Precision of a round trip: e4m3 keeps 3 mantissa bits, so rounding ``W / s`` to it moves a value by
at most half a unit in its last place, ``2^-4`` of its magnitude for normal numbers (``|W / s| >=
2^-6``) and ``2^-10`` below that (subnormal spacing ``2^-9``). Times ``s``, an element comes back
within ``2^-4 |W| + 2^-10 s`` of the original (plus float32 rounding of the division and product), so
no element is off by more than ``2^-4`` (6.25%) of its block's largest magnitude ``448 s``.
"""

from __future__ import annotations

import re

import torch

from r1mega.kernels.fp8_blockwise import BLOCK, FP8, FP8_MAX, block_shape, dequantize_blockwise, quantize_blockwise

__all__ = ["BLOCK", "FP8", "FP8_MAX", "SCALE_SUFFIX", "block_size", "dequantize_blockwise", "quantization_config",
           "quantize_blockwise", "quantize_bucket"]

SCALE_SUFFIX = "_scale_inv"

_QUANTIZED = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|"
                        r"gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")


def quantize_bucket(bucket: list[tuple[str, torch.Tensor]], block: int | tuple[int, int] = BLOCK
                    ) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, t in bucket:
        if t.dim() == 2 and _QUANTIZED.search(name):
            q, s = quantize_blockwise(t, block)
            out += [(name, q), (name + SCALE_SUFFIX, s)]
        else:
            out.append((name, t))
    return out


def quantization_config(block: int | tuple[int, int] = BLOCK) -> dict:
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(block_shape(block))}


def block_size(quant: dict | None, where: str) -> tuple[int, int] | None:
    """The ``(rows, cols)`` scale tile of an HF ``quantization_config`` (None: not quantised).

    Raises ``ValueError`` naming the field for any scheme other than blockwise FP8 e4m3.
    """
    if not quant:
        return None
    method = quant.get("quant_method")
    if method == "mxfp4":  # gpt-oss as published: MXFP4 expert weights (*_blocks / *_scales)
        raise ValueError(f"{where}: quantization_config.quant_method='mxfp4' (MXFP4 expert weights, *_blocks / "
                         "*_scales) is not read by r1mega. Dequantise once with transformers: "
                         "AutoModelForCausalLM.from_pretrained(dir, quantization_config=Mxfp4Config(dequantize=True), "
                         "dtype=torch.bfloat16).save_pretrained(out), or use a BF16 copy of the checkpoint; then "
                         "convert that directory")
    if method != "fp8":
        raise ValueError(f"{where}: quantization_config.quant_method={method!r} is not supported; r1mega reads "
                         "blockwise FP8 (quant_method 'fp8' with weight_block_size) or unquantised weights")
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"{where}: quantization_config.fmt={fmt!r} is not supported (e4m3 only)")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"{where}: quantization_config.activation_scheme={quant.get('activation_scheme')!r} "
                         "is not supported: static activation scales have no place in the r1mega model "
                         "(expected 'dynamic', as DeepSeek-V3 publishes)")
    block = quant.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0
                                                                         for b in block)):
        raise ValueError(f"{where}: quantization_config.weight_block_size={block!r}: expected two positive "
                         "ints [rows, cols] (per-tensor FP8 scales are not supported)")
    return int(block[0]), int(block[1])
