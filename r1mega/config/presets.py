"""Architecture presets as data: family -> size -> field values of ``ModelConfig``.

``tiny`` sizes are for tests and the CPU demo (seconds per step on 2 cores); the larger sizes follow
the published configs of each family and are what cluster recipes use. MoE families (``MOE_PRESETS``)
set ``num_experts``; dense student families (``DENSE_PRESETS``: Qwen2/Qwen2.5, Qwen3 dense, Llama 3.x,
the bases of the DeepSeek-R1 distilled models) leave it unset.
"""

from __future__ import annotations

from dataclasses import fields, replace

from r1mega.config.schema import ModelConfig

# YaRN settings the MLA models are built with (megatron's MLATransformerConfig; its default
# mscale_all_dim=0 would scale only the rope part of q.k, unlike DeepSeek-V3). These are DeepSeek-V3's
# published values; the bridge writes them and refuses a config.json with others.
YARN_FIXED = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

_QWEN3_MOE_BASE = dict(
    norm_epsilon=1e-6,
    rotary_base=1_000_000,
    rope_type="rope",
    qk_layernorm=True,
    tie_word_embeddings=False,
    init_method_std=0.02,
    moe_router_score_function="softmax",
    moe_router_pre_softmax=False,  # top-k then softmax == softmax, top-k, renormalise
    moe_router_enable_expert_bias=False,
    moe_router_load_balancing_type="aux_loss",
    moe_aux_loss_coeff=1e-3,
    first_k_dense_layers=0,
    multi_latent_attention=False,
)

_MIXTRAL_BASE = dict(
    norm_epsilon=1e-5,
    rotary_base=1_000_000,
    rope_type="rope",
    qk_layernorm=False,
    tie_word_embeddings=False,
    init_method_std=0.02,
    moe_router_score_function="softmax",
    moe_router_pre_softmax=False,
    moe_router_enable_expert_bias=False,
    moe_router_load_balancing_type="aux_loss",
    moe_aux_loss_coeff=1e-2,
    first_k_dense_layers=0,
    multi_latent_attention=False,
)

_DEEPSEEK_V3_BASE = dict(
    norm_epsilon=1e-6,
    rotary_base=10_000,
    qk_layernorm=True,  # MLA latent norms (q_a_layernorm / kv_a_layernorm in HF)
    tie_word_embeddings=False,
    init_method_std=0.006,
    moe_router_score_function="sigmoid",
    moe_router_pre_softmax=False,
    moe_router_enable_expert_bias=True,
    moe_router_bias_update_rate=1e-3,
    moe_router_load_balancing_type="seq_aux_loss",
    moe_aux_loss_coeff=1e-4,
    multi_latent_attention=True,
    mtp_num_layers=0,
    mtp_loss_scale=0.0,  # RL and SFT here do not train the MTP layer (DeepSeek-V3 pre-trained with 0.3, then 0.1)
)

# Dense students: SwiGLU MLP, RMSNorm, RoPE, GQA. Qwen2 has q/k/v biases, Qwen3 per-head q/k RMSNorm,
# Llama 3.1+ scales the RoPE frequencies ("llama3"); small Qwen models tie the embeddings.
_QWEN2_BASE = dict(norm_epsilon=1e-6, rotary_base=1_000_000, rope_type="rope", qk_layernorm=False,
                   add_qkv_bias=True, tie_word_embeddings=False, init_method_std=0.02,
                   multi_latent_attention=False)
_QWEN3_BASE = dict(_QWEN2_BASE, qk_layernorm=True, add_qkv_bias=False)
_LLAMA3_BASE = dict(norm_epsilon=1e-5, rotary_base=500_000, rope_type="llama3", rotary_scaling_factor=8.0,
                    original_max_position_embeddings=8192, qk_layernorm=False, add_qkv_bias=False,
                    tie_word_embeddings=False, init_method_std=0.02, multi_latent_attention=False)
_TINY_DENSE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                   ffn_hidden_size=128, vocab_size=512, max_position_embeddings=1024, init_method_std=0.05)

DENSE_PRESETS: dict[str, dict[str, dict]] = {
    "qwen2": {
        "tiny": dict(_QWEN2_BASE, **_TINY_DENSE),
        # Qwen2.5-1.5B (tied; the base of DeepSeek-R1-Distill-Qwen-1.5B, which unties them)
        "1.5b": dict(_QWEN2_BASE, num_layers=28, hidden_size=1536, num_attention_heads=12, num_query_groups=2,
                     kv_channels=128, ffn_hidden_size=8960, vocab_size=151936, max_position_embeddings=32768,
                     tie_word_embeddings=True),
        # Qwen2-7B / Qwen2.5-7B
        "7b": dict(_QWEN2_BASE, num_layers=28, hidden_size=3584, num_attention_heads=28, num_query_groups=4,
                   kv_channels=128, ffn_hidden_size=18944, vocab_size=152064, max_position_embeddings=32768),
        # DeepSeek-R1-Distill-Qwen-7B (Qwen2.5-Math-7B: rope base 10000, 131072 positions)
        "r1_distill_7b": dict(_QWEN2_BASE, num_layers=28, hidden_size=3584, num_attention_heads=28,
                              num_query_groups=4, kv_channels=128, ffn_hidden_size=18944, vocab_size=152064,
                              max_position_embeddings=131072, rotary_base=10000),
    },
    "qwen3": {
        "tiny": dict(_QWEN3_BASE, **_TINY_DENSE),
        "0.6b": dict(_QWEN3_BASE, num_layers=28, hidden_size=1024, num_attention_heads=16, num_query_groups=8,
                     kv_channels=128, ffn_hidden_size=3072, vocab_size=151936, max_position_embeddings=40960,
                     tie_word_embeddings=True),
        "8b": dict(_QWEN3_BASE, num_layers=36, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                   kv_channels=128, ffn_hidden_size=12288, vocab_size=151936, max_position_embeddings=40960),
    },
    "llama3": {
        # head dim 16: megatron's fixed original context (8192) still puts these frequencies in all three
        # llama3 bands (kept, divided by the factor, interpolated), so the scaling is really exercised
        "tiny": dict(_LLAMA3_BASE, **_TINY_DENSE),
        # Llama-3.2-1B (tied, factor 32)
        "1b": dict(_LLAMA3_BASE, num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
                   kv_channels=64, ffn_hidden_size=8192, vocab_size=128256, max_position_embeddings=131072,
                   rotary_scaling_factor=32.0, tie_word_embeddings=True),
        # Llama-3.1-8B (the base of DeepSeek-R1-Distill-Llama-8B)
        "8b": dict(_LLAMA3_BASE, num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                   kv_channels=128, ffn_hidden_size=14336, vocab_size=128256, max_position_embeddings=131072),
    },
}

MOE_PRESETS: dict[str, dict[str, dict]] = {
    "qwen3_moe": {
        "tiny": dict(_QWEN3_MOE_BASE, num_layers=2, hidden_size=64, num_attention_heads=4,
                     num_query_groups=2, kv_channels=16, ffn_hidden_size=128, vocab_size=512,
                     max_position_embeddings=1024, num_experts=8, moe_router_topk=2,
                     moe_ffn_hidden_size=32, init_method_std=0.05),
        "30b_a3b": dict(_QWEN3_MOE_BASE, num_layers=48, hidden_size=2048, num_attention_heads=32,
                        num_query_groups=4, kv_channels=128, ffn_hidden_size=6144,
                        vocab_size=151936, max_position_embeddings=40960, num_experts=128,
                        moe_router_topk=8, moe_ffn_hidden_size=768),
        "235b_a22b": dict(_QWEN3_MOE_BASE, num_layers=94, hidden_size=4096, num_attention_heads=64,
                          num_query_groups=4, kv_channels=128, ffn_hidden_size=12288,
                          vocab_size=151936, max_position_embeddings=40960, num_experts=128,
                          moe_router_topk=8, moe_ffn_hidden_size=1536),
    },
    "deepseek_v3": {
        "tiny": dict(_DEEPSEEK_V3_BASE, num_layers=4, hidden_size=64, num_attention_heads=4,
                     num_query_groups=4, ffn_hidden_size=128, vocab_size=512,
                     max_position_embeddings=1024, num_experts=16, moe_router_topk=4,
                     moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=32,
                     moe_router_num_groups=4, moe_router_group_topk=2,
                     moe_router_topk_scaling_factor=2.5, first_k_dense_layers=1,
                     q_lora_rank=48, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8,
                     v_head_dim=16, kv_channels=16, init_method_std=0.05, rope_type="rope"),
        "671b": dict(_DEEPSEEK_V3_BASE, num_layers=61, hidden_size=7168, num_attention_heads=128,
                     num_query_groups=128, ffn_hidden_size=18432, vocab_size=129280,
                     max_position_embeddings=163840, num_experts=256, moe_router_topk=8,
                     moe_ffn_hidden_size=2048, moe_shared_expert_intermediate_size=2048,
                     moe_router_num_groups=8, moe_router_group_topk=4,
                     moe_router_topk_scaling_factor=2.5, first_k_dense_layers=3,
                     q_lora_rank=1536, kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64,
                     v_head_dim=128, kv_channels=128, rope_type="yarn",
                     rotary_scaling_factor=40.0, original_max_position_embeddings=4096,
                     init_method_std=0.02,  # config.json's initializer_range (the paper trained with 0.006)
                     mtp_num_layers=1),
    },
    "mixtral": {
        "tiny": dict(_MIXTRAL_BASE, num_layers=2, hidden_size=64, num_attention_heads=4,
                     num_query_groups=2, kv_channels=16, ffn_hidden_size=128, vocab_size=512,
                     max_position_embeddings=1024, num_experts=4, moe_router_topk=2,
                     moe_ffn_hidden_size=96, init_method_std=0.05),
        "8x7b": dict(_MIXTRAL_BASE, num_layers=32, hidden_size=4096, num_attention_heads=32,
                     num_query_groups=8, kv_channels=128, ffn_hidden_size=14336, vocab_size=32000,
                     max_position_embeddings=32768, num_experts=8, moe_router_topk=2,
                     moe_ffn_hidden_size=14336),
    },
}

PRESETS: dict[str, dict[str, dict]] = {**MOE_PRESETS, **DENSE_PRESETS}


def is_dense_preset(preset: str) -> bool:
    return preset in DENSE_PRESETS


def resolve_model(model: ModelConfig) -> ModelConfig:
    """Fill every ``None`` architecture field from the preset; explicit values win."""
    if model.preset not in PRESETS:
        raise ValueError(
            f"model.preset={model.preset!r} is unknown; choose one of {sorted(PRESETS)}."
        )
    sizes = PRESETS[model.preset]
    if model.size not in sizes:
        raise ValueError(
            f"model.size={model.size!r} is not a size of preset {model.preset!r}; "
            f"choose one of {sorted(sizes)}."
        )
    preset = sizes[model.size]
    updates = {
        f.name: preset[f.name]
        for f in fields(ModelConfig)
        if getattr(model, f.name) is None and f.name in preset
    }
    resolved = replace(model, **updates)
    if resolved.moe_ffn_hidden_size is None and resolved.num_experts:
        resolved = replace(resolved, moe_ffn_hidden_size=resolved.ffn_hidden_size)
    return resolved
