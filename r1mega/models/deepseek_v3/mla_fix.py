"""Fix for a megatron-core MLA gradient bug at tensor parallelism > 1 (not CPU specific).

In ``transformer/multi_latent_attention.py`` the down-projected ``[kv_latent | k_rope]`` is sharded
across TP ranks and restored with ``gather_from_tensor_model_parallel_region``, whose backward only
*splits* the gradient. The rope key is shared by all heads, and each TP rank holds different heads,
so its gradient is a per-rank partial sum that must be all-reduced over TP; megatron drops the other
ranks' parts (the rope rows of ``linear_kv_down_proj``'s gradient were 52-70% wrong at TP2).

The fix wraps that one gather: forward is unchanged; backward all-reduces the rope-key columns over
TP before the split. The latent columns are already complete (their consumer, ``linear_kv_up_proj``,
reduces its input gradient), so they are left alone. The q-side gather is not touched.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.distributed as dist

_state = threading.local()
_INSTALLED = False


class _AllReduceTailGrad(torch.autograd.Function):
    """Identity forward; backward sums the last ``tail`` features of the gradient over ``group``."""

    @staticmethod
    def forward(ctx, x, tail: int, group):
        ctx.tail = tail
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        tail = grad[..., -ctx.tail:].contiguous()
        dist.all_reduce(tail, group=ctx.group)
        grad[..., -ctx.tail:] = tail
        return grad, None, None


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer import multi_latent_attention as mla

    original_gather = mla.gather_from_tensor_model_parallel_region

    def gather(input_, group=None):
        out = original_gather(input_, group)
        if getattr(_state, "q_pending", False):  # the q-side gather comes first when q_lora_rank is set
            _state.q_pending = False
            return out
        rope_width = getattr(_state, "rope_width", None)
        kv_width = getattr(_state, "kv_width", None)
        if rope_width and out.size(-1) == kv_width and getattr(_state, "kv_pending", False):
            _state.kv_pending = False
            group = mappings.get_tensor_model_parallel_group_if_none(group)
            out = _AllReduceTailGrad.apply(out, rope_width, group)
        return out

    original_qkv = mla.MLASelfAttention.get_query_key_value_tensors

    @functools.wraps(original_qkv)
    def get_query_key_value_tensors(self, *args, **kwargs):
        cfg = self.config
        _state.rope_width = cfg.qk_pos_emb_head_dim
        _state.kv_width = cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim
        _state.kv_pending = True
        _state.q_pending = cfg.q_lora_rank is not None
        try:
            return original_qkv(self, *args, **kwargs)
        finally:
            _state.rope_width = None
            _state.kv_pending = False
            _state.q_pending = False

    mla.gather_from_tensor_model_parallel_region = gather
    mla.MLASelfAttention.get_query_key_value_tensors = get_query_key_value_tensors
    _INSTALLED = True
