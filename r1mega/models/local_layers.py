"""Torch-only layers that stand in for Transformer Engine ones in megatron-core's local spec.

megatron-core's own local modules fall short for r1mega in two places: ``WrappedTorchNorm`` refuses
sequence parallelism (mandatory for MoE with TP > 1), and ``DotProductAttention`` rejects the
separate q/k and v head sizes that multi-latent attention passes, materialises [b, h, s, s] scores
and cannot do packed (padding-free) sequences. These replacements fix all three.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from r1mega.platform.megatron_compat import ensure_megatron

ensure_megatron()

from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.utils import divide  # noqa: E402


class SequenceParallelNorm:
    """RMSNorm/LayerNorm whose weights are tagged for sequence-parallel gradient all-reduce.

    With sequence parallelism each TP rank sees a slice of the tokens, so norm-weight gradients are
    partial; megatron's ``finalize_model_grads`` all-reduces parameters tagged ``sequence_parallel``.
    The same tag is right for q/k norms (each rank holds a subset of heads).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization={config.normalization!r}: use RMSNorm or LayerNorm")
        for param in norm.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))
        return norm


class SDPAttention(MegatronModule):
    """Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

    Accepts MLA's ``k_channels``/``v_channels``, GQA (grouped key/value heads) and packed sequences
    (``packed_seq_params`` with ``cu_seqlens``: a block-diagonal causal mask, so packed samples never
    attend to each other).
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **unused,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine attention (TE spec)")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.k_channels = k_channels or config.kv_channels
        self.v_channels = v_channels or config.kv_channels
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups or config.num_attention_heads, tp_size)
        self.softmax_scale = softmax_scale if softmax_scale is not None else self.k_channels ** -0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPAttention")
        packed = packed_seq_params is not None
        thd = query.dim() == 3  # packed tokens without a batch dim: [t, h, d]
        if thd:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if self.heads_per_partition != k.size(1):
            repeat = self.heads_per_partition // k.size(1)
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        dropout = self.dropout_p if self.training else 0.0
        if packed:
            mask = _packed_causal_mask(packed_seq_params.cu_seqlens_q, q.size(2), q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 scale=self.softmax_scale)
        elif attention_mask is not None and (attn_mask_type or self.attn_mask_type) != AttnMaskType.causal:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask.bool(),
                                                 dropout_p=dropout, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                                 scale=self.softmax_scale)
        # [b, h, s, dv] -> [s, b, h * dv]
        out = out.permute(2, 0, 1, 3).contiguous()
        out = out.view(out.size(0), out.size(1), -1)
        return out.squeeze(1) if thd else out


def _packed_causal_mask(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
    """Boolean [total, total] mask: True where query i may attend key j (same sample, j <= i)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
    sample_id = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    if sample_id.numel() < total:  # trailing padding forms its own segment
        pad = torch.full((total - sample_id.numel(),), -1, device=device, dtype=sample_id.dtype)
        sample_id = torch.cat([sample_id, pad])
    same = sample_id[:, None] == sample_id[None, :]
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    return same & causal
