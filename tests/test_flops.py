"""FLOPs accounting (r1mega.train.flops) against megatron-LM's formula and hand-computed numbers."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from r1mega.config import ModelConfig, resolve_model
from r1mega.train.flops import dense_model, flops_breakdown, flops_per_token, padded_vocab

REPO = Path(__file__).resolve().parent.parent


def megatron_num_floating_point_operations(args, batch_size: int) -> float:
    """megatron-LM ``training/training.py`` ``transformer_flops()`` (MHA/GQA, MLA, MoE, no MTP), re-typed.

    Written from megatron's formula, not from r1mega's code: per-token it is
    3 (fwd+bwd) * 2 (FMA) * [h * (ffn*3*dense + (moe_ffn*topk*3 + shared*3)*moe) + attn + h*V_padded].
    """
    if args.num_experts is None:
        num_dense_layers, num_moe_layers, num_experts_routed_to = args.num_layers, 0, 0
    else:
        pattern = args.moe_layer_freq
        num_moe_layers = sum(pattern)
        num_dense_layers = args.num_layers - num_moe_layers
        num_experts_routed_to = args.moe_router_topk
    moe_ffn_hidden_size = args.moe_ffn_hidden_size if args.moe_ffn_hidden_size is not None else args.ffn_hidden_size
    shared = 0 if args.moe_shared_expert_intermediate_size is None else args.moe_shared_expert_intermediate_size
    fb, fma, ffn_x = 3, 2, 3  # swiglu
    if args.multi_latent_attention:
        if args.q_lora_rank is None:
            q_term = args.hidden_size * args.num_attention_heads * (args.qk_head_dim + args.qk_pos_emb_head_dim)
        else:
            q_term = args.q_lora_rank * (args.hidden_size + args.num_attention_heads
                                         * (args.qk_head_dim + args.qk_pos_emb_head_dim) + 1)
        attn = fb * fma * (
            q_term
            + args.kv_lora_rank * (args.hidden_size + args.num_attention_heads * (args.qk_head_dim + args.v_head_dim)
                                   + 1)
            + args.hidden_size * args.qk_pos_emb_head_dim
            + (args.num_attention_heads * args.v_head_dim) * args.hidden_size
            + args.seq_length * (args.num_attention_heads * (args.qk_head_dim + args.qk_pos_emb_head_dim)) / 2
            + args.seq_length * args.num_attention_heads * args.v_head_dim / 2
        )
    else:
        qp = args.kv_channels * args.num_attention_heads
        kp = vp = args.kv_channels * args.num_query_groups
        attn = fb * fma * (args.hidden_size * (qp + kp + vp) + qp * args.seq_length / 2 * 2 + qp * args.hidden_size)
    return batch_size * args.seq_length * (
        fb * fma * args.hidden_size * (
            args.ffn_hidden_size * ffn_x * num_dense_layers
            + moe_ffn_hidden_size * num_experts_routed_to * ffn_x * num_moe_layers
            + shared * ffn_x * num_moe_layers
        )
        + attn * args.num_layers
        + fb * fma * args.hidden_size * args.padded_vocab_size
    )


def _megatron_args(m: ModelConfig, seq: int) -> SimpleNamespace:
    moe = bool(m.num_experts)
    first = m.first_k_dense_layers or 0
    return SimpleNamespace(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels, seq_length=seq, padded_vocab_size=padded_vocab(m.vocab_size),
        num_experts=m.num_experts if moe else None, moe_router_topk=m.moe_router_topk,
        moe_layer_freq=[0] * first + [1] * (m.num_layers - first),
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        multi_latent_attention=bool(m.multi_latent_attention), q_lora_rank=m.q_lora_rank,
        kv_lora_rank=m.kv_lora_rank, qk_head_dim=m.qk_head_dim, qk_pos_emb_head_dim=m.qk_pos_emb_head_dim,
        v_head_dim=m.v_head_dim,
    )


@pytest.mark.parametrize("model", [
    ModelConfig(preset="qwen3_moe", size="30b_a3b"),
    ModelConfig(preset="qwen3_moe", size="235b_a22b"),
    ModelConfig(preset="mixtral", size="8x7b"),
    ModelConfig(preset="deepseek_v3", size="671b"),
    ModelConfig(preset="deepseek_v3", size="tiny"),
    ModelConfig(preset="deepseek_v3", size="671b", q_lora_rank=0),  # no q compression (V2-Lite style)
    ModelConfig(preset="deepseek_v3", size="moonlight_16b_a3b"),
    ModelConfig(preset="deepseek_v3", size="kimi_k2"),
    ModelConfig(preset="deepseek_v2", size="lite"),
], ids=lambda m: f"{m.preset}-{m.size}{'-noqlora' if m.q_lora_rank == 0 else ''}")
@pytest.mark.parametrize("seq", [1, 4096, 32768])
def test_moe_and_mla_match_megatron(model, seq):
    m = resolve_model(model)
    args = _megatron_args(m, seq)
    if m.q_lora_rank == 0:
        args.q_lora_rank = None
    b = flops_breakdown(m, seq)
    want = megatron_num_floating_point_operations(args, batch_size=1) / seq
    assert b.megatron_total == pytest.approx(want, rel=1e-12)
    # the router is the only extra term, and it is small at real sizes
    bound = 0.006 if m.hidden_size >= 1024 else 0.02
    assert 0 < b.model_flops_per_token - b.megatron_total < bound * b.model_flops_per_token


@pytest.mark.parametrize("size", ["qwen3_8b", "llama3_8b", "tiny"])
@pytest.mark.parametrize("seq", [128, 4096])
def test_dense_gqa_matches_megatron(size, seq):
    m = dense_model(size)
    b = flops_breakdown(m, seq)
    assert "router" not in b.terms and "moe.routed_experts" not in b.terms
    assert b.model_flops_per_token == pytest.approx(
        megatron_num_floating_point_operations(_megatron_args(m, seq), batch_size=1) / seq, rel=1e-12)


def test_dense_llama3_8b_is_about_six_times_params():
    # 6 * N (non-embedding params, 7.0e9 for Llama-3-8B without embeddings) + attention + logits
    b = flops_breakdown(dense_model("llama3_8b"), 2048)
    assert 6 * 6.9e9 < b.model_flops_per_token < 6 * 8.3e9


def _tiny_mla(**kw) -> ModelConfig:
    return ModelConfig(preset="deepseek_v3", size="tiny", num_layers=1, hidden_size=8, num_attention_heads=2,
                       num_query_groups=2, multi_latent_attention=True, q_lora_rank=4, kv_lora_rank=3,
                       qk_head_dim=2, qk_pos_emb_head_dim=1, v_head_dim=2, kv_channels=2, ffn_hidden_size=5,
                       vocab_size=100, num_experts=0, **kw)


def test_tiny_mla_by_hand():
    b = flops_breakdown(_tiny_mla(), seq_len=6)
    hand = {
        "attn.q_down": 2 * 8 * 4,            # 64
        "attn.q_up": 2 * 4 * 2 * (2 + 1),    # 48
        "attn.kv_down": 2 * 8 * (3 + 1),     # 64: latent + shared rope key
        "attn.kv_up": 2 * 3 * 2 * (2 + 2),   # 48: k_nope and v per head
        "attn.latent_norms": 2 * (4 + 3),    # 14
        "attn.scores": 2 * 3 * 2 * 3,        # 36: s/2 = 3 keys, 2 heads, dim 2+1
        "attn.context": 2 * 3 * 2 * 2,       # 24
        "attn.out_proj": 2 * 2 * 2 * 8,      # 64
        "mlp.dense": 2 * 3 * 8 * 5,          # 240
        "embedding": 0,
        "output_layer": 2 * 8 * 128,         # 2048: vocab 100 padded to 128
    }
    assert b.terms == hand
    assert b.forward == 2650
    assert b.training() == 3 * 2650 == flops_per_token(_tiny_mla(), 6)
    assert b.training("full") == 4 * 2650
    assert b.training("selective") == 3 * 2650 + 36 + 24


def test_tiny_mla_moe_by_hand():
    # 2 layers: layer 0 dense, layer 1 MoE with 4 experts (top-2, ffn 3) and a shared expert (ffn 2)
    cfg = replace(_tiny_mla(), num_layers=2, first_k_dense_layers=1, num_experts=4, moe_router_topk=2,
                  moe_ffn_hidden_size=3, moe_shared_expert_intermediate_size=2)
    b = flops_breakdown(cfg, seq_len=6)
    assert b.terms["mlp.dense"] == 240
    assert b.terms["router"] == 2 * 8 * 4
    assert b.terms["moe.routed_experts"] == 2 * 3 * 8 * 3 * 2
    assert b.terms["moe.shared_experts"] == 2 * 3 * 8 * 2
    assert b.terms["attn.q_down"] == 2 * 64  # every layer has attention
    assert b.forward == 2 * (64 + 48 + 64 + 48 + 14 + 36 + 24 + 64) + 240 + 64 + 288 + 96 + 2048


def test_bench_mfu_flops_only_prints_value_and_table():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_mfu.py"), "--flops-only",
                           "--model", "qwen3_moe", "--size", "30b_a3b", "--seq-len", "4096"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    want = flops_per_token(ModelConfig(preset="qwen3_moe", size="30b_a3b"), 4096)
    assert f"flops_per_token={want:.6e}" in proc.stdout
    assert "moe.routed_experts" in proc.stdout and "attn.scores" in proc.stdout
    dense = subprocess.run([sys.executable, str(REPO / "tools" / "bench_mfu.py"), "--flops-only",
                            "--model", "dense", "--size", "llama3_8b", "--seq-len", "4096"],
                           capture_output=True, text=True, timeout=60)
    assert dense.returncode == 0, dense.stderr
    assert "mlp.dense" in dense.stdout and "\nrouter " not in dense.stdout
