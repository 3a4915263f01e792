"""Torch-only layers that stand in for Transformer Engine ones in megatron-core's local spec.

megatron-core's own local modules fall short for r1mega in three places: ``WrappedTorchNorm`` refuses
sequence parallelism (mandatory for MoE with TP > 1), ``DotProductAttention`` rejects the
separate q/k and v head sizes that multi-latent attention passes, materialises [b, h, s, s] scores
and can do neither packed (padding-free) sequences nor context parallelism (``SDPAttention`` keeps its
sliding windows and attention sinks, megatron's ``window_size`` / ``softmax_type``), and ``SelfAttention``
rotates its whole static-inference KV cache again at every decode step. These replacements fix
all of that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from r1mega.platform.megatron_compat import ensure_megatron

ensure_megatron()

from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes  # noqa: E402
from megatron.core.transformer.attention import SelfAttention  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.utils import is_layer_window_attention  # noqa: E402
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

    Accepts MLA's ``k_channels``/``v_channels``, GQA (grouped key/value heads), packed sequences
    (``packed_seq_params`` with ``cu_seqlens``: one causal attention per sequence, so packed samples
    never attend to each other and no [T, T] mask is built) and context parallelism (this rank's
    queries against K/V all-gathered over the CP group, masked by global position; see
    ``models.context_parallel``).

    As megatron's ``DotProductAttention`` it honours ``window_size`` per layer (``window_attn_skip_freq``;
    ``(left, right)`` tokens around the query, right = 0) and ``softmax_type``: ``learnable`` adds a per-head
    logit ``softmax_offset`` (attention sinks, gpt-oss) to the softmax denominator, ``off-by-one`` a fixed 0.
    Those layers compute their scores explicitly (``_windowed_or_sink``), not with flash-style SDPA; context
    parallelism is refused there.
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
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        tp_size = pg_collection.tp.size()
        self.cp_group = getattr(pg_collection, "cp", None) if config.context_parallel_size > 1 else None
        # CP: the gathered K/V are recomputed in the backward pass unless megatron's activation recompute
        # (parallel.recompute_granularity) already reruns this forward
        self.recompute_cp_core = config.recompute_granularity is None
        self.attn_mask_type = attn_mask_type
        self.k_channels = k_channels or config.kv_channels
        self.v_channels = v_channels or config.kv_channels
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups or config.num_attention_heads, tp_size)
        self.softmax_scale = softmax_scale if softmax_scale is not None else self.k_channels ** -0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.window = config.window_size if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number) else None
        if self.window is not None and self.window[1] != 0:
            raise ValueError(f"window_size={config.window_size}: causal attention sees no tokens to the right; "
                             "set (left, 0)")
        self.softmax_type = config.softmax_type
        if config.softmax_type == "learnable":  # megatron's name and TP split (dim 0, heads)
            self.softmax_offset = torch.nn.Parameter(torch.zeros(self.heads_per_partition, dtype=config.params_dtype))
            set_tensor_model_parallel_attributes(self.softmax_offset, True, 0, 1)
            if config.perform_initialization:
                config.init_method(self.softmax_offset)
        elif config.softmax_type == "off-by-one":
            self.register_buffer("softmax_offset", torch.zeros(self.heads_per_partition), persistent=False)
        elif config.softmax_type == "vanilla":
            self.softmax_offset = None
        else:
            raise ValueError(f"softmax_type={config.softmax_type!r}: vanilla, off-by-one or learnable")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPAttention")
        packed = packed_seq_params is not None
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        thd = query.dim() == 3  # packed tokens without a batch dim: [t, h, d]
        if thd:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        cp = 1 if self.cp_group is None else self.cp_group.size()
        bounds = packed_seq_params.cu_seqlens_q if packed else [0, query.size(0) * cp]
        dropout = self.dropout_p if self.training else 0.0
        if self.window is not None or self.softmax_offset is not None:
            if cp > 1:
                raise ValueError("context parallelism with sliding-window attention or attention sinks is not "
                                 "supported by the local core attention: set parallel.cp=1 (or use TE)")
            out = self._windowed_or_sink(query, key, value, None if packed else attention_mask, bounds, dropout)
        elif cp > 1:
            if not causal:
                raise ValueError("context parallelism supports causal self-attention only")
            if self.recompute_cp_core:
                # recomputed in the backward pass, so no layer keeps all ranks' K/V (or its padded query
                # blocks) alive until then: per-rank memory stays this rank's share of the sequence
                out = checkpoint(self._context_parallel, query, key, value, bounds, dropout, use_reentrant=False)
            else:  # megatron's activation recompute reruns this forward already
                out = self._context_parallel(query, key, value, bounds, dropout)
        elif attention_mask is not None and not packed:
            # an explicit mask (megatron's convention: True = masked) is applied as given, causal or not: the
            # megatron rollout engine's left-padded batches hide their pad slots with it (training passes None)
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask.bool(), dropout_p=dropout,
                                                 scale=self.softmax_scale, enable_gqa=self._gqa(k))
        else:
            out = self._causal(query, key, value, causal_pieces(bounds), dropout)
        # [b, h, s, dv] -> [s, b, h * dv]
        out = out.permute(2, 0, 1, 3).contiguous()
        out = out.view(out.size(0), out.size(1), -1)
        return out.squeeze(1) if thd else out

    def _windowed_or_sink(self, query, key, value, attention_mask, bounds, dropout: float) -> torch.Tensor:
        """[s, b, h, d] inputs -> [b, h, s_q, dv] with explicit scores: the causal (or given) mask, this
        layer's window, and the sink logit as an extra softmax column that is dropped afterwards."""
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if self._gqa(k):
            k, v = (x.repeat_interleave(q.size(1) // x.size(1), dim=1) for x in (k, v))
        if attention_mask is not None:  # megatron's convention, True = masked; queries end at the last key
            allowed = ~attention_mask.bool()
            qpos = torch.arange(k.size(2) - q.size(2), k.size(2), device=q.device)
            return self._attend(q, k, v, allowed & self._in_window(qpos, torch.arange(k.size(2), device=q.device)),
                                dropout)
        outs = []
        for piece in causal_pieces(bounds):
            qpos = torch.arange(piece.start, piece.end, device=q.device)
            kpos = torch.arange(piece.segment_start, piece.end, device=q.device)
            allowed = (kpos[None, :] <= qpos[:, None]) & self._in_window(qpos, kpos)
            keys = slice(piece.segment_start, piece.end)
            outs.append(self._attend(q[:, :, piece.rows], k[:, :, keys], v[:, :, keys], allowed, dropout))
        return torch.cat(outs, dim=2)

    def _in_window(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        if self.window is None:
            return torch.ones(qpos.numel(), kpos.numel(), dtype=torch.bool, device=qpos.device)
        return (qpos[:, None] - kpos[None, :]) <= self.window[0]

    def _attend(self, q, k, v, allowed: torch.Tensor, dropout: float) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.softmax_scale
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        if self.softmax_offset is not None:
            sink = self.softmax_offset.float().reshape(1, -1, 1, 1).expand(scores.size(0), -1, scores.size(2), 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        if dropout:
            probs = F.dropout(probs, p=dropout)
        return torch.matmul(probs.to(v.dtype), v)

    def _gqa(self, k: torch.Tensor) -> bool:
        """Grouped K/V heads ([b, h, s, d]): SDPA shares them itself (enable_gqa), without copies."""
        return self.heads_per_partition != k.size(1)

    def _causal(self, query, key, value, pieces: list["Piece"], dropout: float) -> torch.Tensor:
        """[s, b, h, d] inputs (keys in global order) -> [b, h, s_q, dv], one causal SDPA per piece."""
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        gqa = self._gqa(k)
        outs = [self._causal_piece(q, k, v, piece, dropout, gqa) for piece in pieces]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # padded rows: one piece, no copy

    def _context_parallel(self, query, key, value, bounds, dropout: float) -> torch.Tensor:
        key, value = self._gather_global(key, bounds), self._gather_global(value, bounds)
        return self._causal(query, key, value, causal_pieces(bounds, self.cp_group.size(), self.cp_group.rank()),
                            dropout)

    def _gather_global(self, x: torch.Tensor, bounds) -> torch.Tensor:
        """All CP ranks' rows of ``x`` [s_local, ...] in global sequence order [s, ...]."""
        from r1mega.models import context_parallel

        cp = self.cp_group.size()
        gathered = context_parallel.gather_from_context_parallel(x, self.cp_group)
        order = torch.argsort(context_parallel.gathered_index(bounds, cp)).to(x.device)
        return gathered.index_select(0, order)

    def _causal_piece(self, q, k, v, piece: "Piece", dropout: float, gqa: bool) -> torch.Tensor:
        """Queries ``q[..., piece.rows, :]`` at global positions ``[piece.start, piece.end)`` against the keys
        of their sequence up to ``piece.end``: bottom-right-aligned causal attention, computed as a top-left
        causal SDPA with the queries padded in front (flash-style kernels, no mask tensor)."""
        lead = piece.start - piece.segment_start
        query = q[:, :, piece.rows]
        if lead:
            query = torch.cat([query.new_zeros(*query.shape[:2], lead, query.size(3)), query], dim=2)
        keys = slice(piece.segment_start, piece.end)
        out = F.scaled_dot_product_attention(query, k[:, :, keys], v[:, :, keys], is_causal=True, dropout_p=dropout,
                                             scale=self.softmax_scale, enable_gqa=gqa)
        return out[:, :, lead:]


class RopedCacheSelfAttention(SelfAttention):
    """megatron's ``SelfAttention`` whose static-inference KV cache holds keys already rotated.

    megatron caches raw keys and applies the rotary embedding to the whole cache at every decode step:
    O(length) work per generated token, 1.5 s of 3.0 s in a profile of the megatron rollout engine on the
    demo policy (its per-row rotary tables). Rotating each key once, when it enters the cache, gives the
    same keys (the rotation is elementwise per position). Training and dynamic batching are megatron's own
    path.
    """

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
        if (inference_context is None or not inference_context.is_static_batching() or rotary_pos_emb is None
                or self.config.flash_decode):
            return super()._adjust_key_value_for_inference(inference_context, query, key, value, rotary_pos_emb,
                                                           *args, **kwargs)
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
        from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
            _yarn_get_concentration_factor_from_config,
        )

        q_pos_emb, k_pos_emb = rotary_pos_emb
        start = inference_context.sequence_len_offset
        key = apply_rotary_pos_emb(key, k_pos_emb[start: start + key.size(0)], config=self.config,
                                   mscale=_yarn_get_concentration_factor_from_config(self.config),
                                   cp_group=self.pg_collection.cp)
        query, key, value, (q_pos_emb, _), mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, (q_pos_emb, k_pos_emb), *args, **kwargs)
        return query, key, value, (q_pos_emb, None), mask_type, block_table  # the cached keys are rotated


@dataclass(frozen=True)
class Piece:
    """A run of consecutive local query rows: global positions ``[start, end)`` of the sequence segment that
    begins at ``segment_start``."""

    rows: slice
    start: int
    end: int
    segment_start: int


def causal_pieces(bounds, cp: int = 1, cp_rank: int = 0) -> list[Piece]:
    """This rank's query rows as :class:`Piece` s, in local order: one per sequence segment of ``bounds``
    (cu_seqlens), or under context parallelism two per segment (its chunks ``cp_rank`` and
    ``2*cp-1-cp_rank``, megatron's load-balanced layout). Empty segments give nothing."""
    edges = [int(x) for x in (bounds.tolist() if isinstance(bounds, torch.Tensor) else bounds)]
    pieces, row = [], 0
    for seg_start, seg_end in zip(edges[:-1], edges[1:]):
        length = seg_end - seg_start
        if length == 0:
            continue
        if cp == 1:
            spans = [(seg_start, seg_end)]
        else:
            chunk = length // (2 * cp)
            spans = [(seg_start + c * chunk, seg_start + (c + 1) * chunk) for c in (cp_rank, 2 * cp - 1 - cp_rank)]
        for a, b in spans:
            pieces.append(Piece(slice(row, row + b - a), a, b, seg_start))
            row += b - a
    return pieces
