"""Unit tests of the model building blocks: sharding maths, layout-invariant init, SDPA attention."""

from __future__ import annotations

import pytest
import torch

import r1mega.models  # noqa: F401  (readies megatron on CPU)
from r1mega.models.local_layers import Piece, SDPAttention, causal_pieces
from r1mega.models.sharding import ShardInfo, merge_shards, shard_of


def _info(tp_dim, tp_size, rank=0, gated=False, shape=(8, 6)):
    return ShardInfo("w", "w", shape, tp_dim, rank, tp_size, gated)


@pytest.mark.parametrize("tp_dim", [0, 1])
@pytest.mark.parametrize("tp_size", [1, 2])
def test_shard_then_merge_is_identity(tp_dim, tp_size):
    full = torch.arange(48.0).reshape(8, 6)
    shards = [shard_of(full, _info(tp_dim, tp_size, r)) for r in range(tp_size)]
    assert all(s.shape[tp_dim] == full.shape[tp_dim] // tp_size for s in shards)
    assert torch.equal(merge_shards(shards, _info(tp_dim, tp_size)), full)


def test_gated_fc1_splits_gate_and_up_halves_separately():
    # rows 0-3 = gate, rows 4-7 = up; TP2 rank 0 must own gate rows 0-1 and up rows 4-5.
    full = torch.arange(8.0).unsqueeze(1)
    rank0 = shard_of(full, _info(0, 2, 0, gated=True, shape=(8, 1)))
    rank1 = shard_of(full, _info(0, 2, 1, gated=True, shape=(8, 1)))
    assert rank0.flatten().tolist() == [0, 1, 4, 5]
    assert rank1.flatten().tolist() == [2, 3, 6, 7]
    assert torch.equal(merge_shards([rank0, rank1], _info(0, 2, gated=True, shape=(8, 1))), full)


def test_causal_pieces_per_segment_and_per_context_parallel_chunk():
    # packed: one piece per non-empty segment (the trailing padding is a segment too)
    assert causal_pieces(torch.tensor([0, 2, 2, 5, 6])) == [
        Piece(slice(0, 2), 0, 2, 0), Piece(slice(2, 5), 2, 5, 2), Piece(slice(5, 6), 5, 6, 5)]
    # cp2 rank 1: chunks 1 and 2 of 4 of every segment, in local order
    assert causal_pieces([0, 8, 12], cp=2, cp_rank=1) == [
        Piece(slice(0, 2), 2, 4, 0), Piece(slice(2, 4), 4, 6, 0), Piece(slice(4, 5), 9, 10, 8),
        Piece(slice(5, 6), 10, 11, 8)]


def _attention():
    from megatron.core.transformer.enums import AttnMaskType

    class _PG:
        class tp:
            @staticmethod
            def size():
                return 1

    from megatron.core.transformer.module import MegatronModule

    attn = SDPAttention.__new__(SDPAttention)
    MegatronModule.__init__(attn, config=_fake_transformer_config())
    SDPAttention.__init__(attn, _fake_transformer_config(), 1, AttnMaskType.causal, "self", pg_collection=_PG)
    return attn


def _fake_transformer_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                             kv_channels=8, attention_dropout=0.0)


def _reference(q, k, v):
    """Plain causal softmax attention with GQA, [s, b, h, d] in, [s, b, h*d] out."""
    s = q.size(0)
    k = k.repeat_interleave(q.size(2) // k.size(2), dim=2)
    v = v.repeat_interleave(q.size(2) // v.size(2), dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / q.size(-1) ** 0.5
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)
    return out.reshape(s, q.size(1), -1)


def test_sdpa_matches_reference_with_gqa():
    torch.manual_seed(0)
    attn = _attention()
    q, k, v = torch.randn(5, 2, 4, 8), torch.randn(5, 2, 2, 8), torch.randn(5, 2, 2, 8)
    torch.testing.assert_close(attn(q, k, v, None), _reference(q, k, v))


def test_sdpa_packed_equals_separate_sequences():
    from megatron.core.packed_seq_params import PackedSeqParams

    torch.manual_seed(1)
    attn = _attention()
    lengths = [3, 4]
    q, k, v = torch.randn(7, 1, 4, 8), torch.randn(7, 1, 2, 8), torch.randn(7, 1, 2, 8)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    packed = attn(q, k, v, None, packed_seq_params=PackedSeqParams(cu_seqlens_q=cu, cu_seqlens_kv=cu, qkv_format="thd"))
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        torch.testing.assert_close(packed[sl], attn(q[sl], k[sl], v[sl], None))
        start += n


@pytest.mark.parametrize("tokens", [3, 4])  # 4 tokens = 4 experts: megatron's broadcast was silently wrong
def test_expert_bias_counts_skip_padding_tokens(tokens):
    """megatron 0.16.1 masked the [tokens, experts] routing map with the [tokens] padding mask along the
    expert axis; r1mega's fix (megatron_compat) masks each padding token's row."""
    from types import SimpleNamespace

    from megatron.core.transformer.moe.router import TopKRouter

    router = SimpleNamespace(enable_expert_bias=True, local_tokens_per_expert=torch.zeros(4))
    routing_map = torch.zeros(tokens, 4, dtype=torch.bool)
    routing_map[torch.arange(tokens), (torch.arange(tokens) + 1) % 4] = True  # token i -> expert i + 1
    padding = torch.zeros(tokens, dtype=torch.bool)
    padding[1] = True
    TopKRouter._apply_expert_bias(router, routing_map, padding_mask=padding)
    expected = torch.tensor([1.0 if tokens == 4 else 0.0, 1.0, 0.0, 1.0])  # the padding token's expert 2 not counted
    assert torch.equal(router.local_tokens_per_expert, expected)


def test_rotary_cos_sin_are_reused_only_for_the_same_table_memory_and_version():
    """The rotation's cos/sin are kept for the last table (every layer rotates by the same one); a write to
    the table, another slice of it, another mscale or dtype computes them again, with megatron's values."""
    from megatron.core.models.common.embeddings import rope_utils

    from r1mega.platform.megatron_compat import _LastRotation

    last = _LastRotation()
    table = torch.randn(6, 1, 1, 8)
    cos_, sin_ = last.cos_sin(table[:4], 1.0, torch.float32)
    assert torch.equal(cos_, torch.cos(table[:4])) and torch.equal(sin_, torch.sin(table[:4]))
    assert last.cos_sin(table[:4], 1.0, torch.float32)[0] is cos_  # another view of the same memory: kept
    assert torch.equal(last.cos_sin(table[2:], 1.0, torch.float32)[0], torch.cos(table[2:]))  # other slots
    assert torch.equal(last.cos_sin(table[2:], 0.5, torch.float32)[1], torch.sin(table[2:]) * 0.5)
    assert last.cos_sin(table[2:], 0.5, torch.float64)[0].dtype == torch.float64
    before = last.cos_sin(table[2:], 0.5, torch.float64)[0]
    table.mul_(2.0)  # an in-place write bumps the version counter every view shares
    after = last.cos_sin(table[2:], 0.5, torch.float64)[0]
    assert after is not before and torch.equal(after, (torch.cos(table[2:]) * 0.5).double())
    # the patched megatron function, applied twice to one table, gives megatron's rotation
    t = torch.randn(4, 2, 3, 8)
    expected = t * torch.cos(table[:4]) + rope_utils._rotate_half(t, False) * torch.sin(table[:4])
    for _ in range(2):
        assert torch.equal(rope_utils._apply_rotary_pos_emb_bshd(t, table[:4]), expected)
