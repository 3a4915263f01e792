"""Builds the policy (MoE or dense) as a megatron-core ``GPTModel`` from an r1mega ``ModelConfig``.

All model construction goes through :func:`build_policy`, so a switch of megatron's model class
(newer releases deprecate ``GPTModel`` for ``HybridModel``) is one change here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r1mega.config.presets import YARN_FIXED
from r1mega.config.schema import ModelConfig, ParallelConfig
from r1mega.models import routing_replay
from r1mega.models.layer_spec import build_block_spec, build_mtp_block_spec, use_transformer_engine
from r1mega.models.mtp import MTPGPTModel
from r1mega.platform.megatron_compat import supports_routing_replay

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.transformer.enums import AttnBackend  # noqa: E402
from megatron.core.transformer.transformer_config import (  # noqa: E402
    MLATransformerConfig,
    TransformerConfig,
)

VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Megatron shards the vocabulary over TP; pad so every layout gets the same padded size."""
    multiple = math.lcm(VOCAB_PAD_MULTIPLE, tp)
    return -(-vocab_size // multiple) * multiple


def _dtype(precision: str) -> torch.dtype:
    return torch.float32 if precision == "fp32" else torch.bfloat16


def _moe_kwargs(model: ModelConfig) -> dict:
    """MoE fields of the ``TransformerConfig``; none for a dense model (megatron rejects them there)."""
    if not model.num_experts:
        return {}
    first_dense = model.first_k_dense_layers or 0
    return dict(
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
        moe_router_score_function=model.moe_router_score_function,
        moe_router_pre_softmax=bool(model.moe_router_pre_softmax),
        moe_router_enable_expert_bias=bool(model.moe_router_enable_expert_bias),
        moe_router_bias_update_rate=model.moe_router_bias_update_rate or 1e-3,
        moe_router_num_groups=model.moe_router_num_groups,
        moe_router_group_topk=model.moe_router_group_topk,
        moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
        moe_router_load_balancing_type=model.moe_router_load_balancing_type or "none",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff or 0.0,
        moe_router_dtype="fp32",
        moe_grouped_gemm=False,
        moe_layer_freq=[0] * first_dense + [1] * (model.num_layers - first_dense),
        # router replay hooks (R2/R3, models/routing_replay.py); inactive unless a pass sets an action
        moe_enable_routing_replay=supports_routing_replay(),
    )


def _mtp_kwargs(model: ModelConfig) -> dict:
    """Multi-token prediction (megatron's MTP block on the last pipeline stage); none without layers."""
    if not model.mtp_num_layers:
        return {}
    return dict(mtp_num_layers=model.mtp_num_layers, mtp_loss_scaling_factor=float(model.mtp_loss_scale or 0.0))


def transformer_config(model: ModelConfig, parallel: ParallelConfig) -> TransformerConfig:
    """The megatron ``TransformerConfig`` (``MLATransformerConfig`` for MLA) of a resolved model."""
    use_te = use_transformer_engine(model.precision, model.fp8_recipe)
    sequence_parallel = parallel.tp > 1 if parallel.sequence_parallel is None else parallel.sequence_parallel
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(model.add_qkv_bias),
        qk_layernorm=bool(model.qk_layernorm),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        sequence_parallel=sequence_parallel,
        params_dtype=_dtype(model.precision),
        pipeline_dtype=_dtype(model.precision),
        bf16=model.precision in ("bf16", "fp8"),
        fp8="hybrid" if model.precision == "fp8" else None,
        fp8_recipe=model.fp8_recipe if model.precision == "fp8" else None,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        attention_backend=AttnBackend.auto if use_te else AttnBackend.local,
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # megatron checks it even for dense models (variable lengths)
        **_moe_kwargs(model),
        **_mtp_kwargs(model),
    )
    if not model.multi_latent_attention:
        return TransformerConfig(**kwargs)
    mla = dict(
        multi_latent_attention=True,
        q_lora_rank=model.q_lora_rank,
        kv_lora_rank=model.kv_lora_rank,
        qk_head_dim=model.qk_head_dim,
        qk_pos_emb_head_dim=model.qk_pos_emb_head_dim,
        v_head_dim=model.v_head_dim,
        rope_type=model.rope_type or "rope",
        rotary_base=model.rotary_base,
    )
    if model.rope_type == "yarn":
        mla.update(rotary_scaling_factor=model.rotary_scaling_factor,
                   original_max_position_embeddings=model.original_max_position_embeddings, **YARN_FIXED)
    return MLATransformerConfig(**kwargs, **mla)


@dataclass
class PolicyStage:
    """What this rank builds: the model chunk and whether it holds embedding / output layer."""

    model: GPTModel
    config: TransformerConfig
    use_te: bool
    model_cfg: ModelConfig
    parallel: ParallelConfig


def build_policy(model: ModelConfig, parallel: ParallelConfig, *, meta: bool = False) -> PolicyStage:
    """This rank's pipeline stage of the policy (needs ``parallel_state`` initialised).

    ``meta=True`` builds it on the meta device: names, shapes, sharding and the sharded state dict,
    no storage and no initialisation. Checkpoint conversion streams tensors through such a model.
    """
    config = transformer_config(model, parallel)
    use_te = use_transformer_engine(model.precision, model.fp8_recipe)
    if not meta:
        gpt = _gpt_model(config, use_te, model, parallel.tp)
    else:
        # megatron allocates on CUDA unless told to initialise on the CPU, where a device context applies
        config.use_cpu_initialization = True
        config.perform_initialization = False
        with torch.device("meta"):
            gpt = _gpt_model(config, use_te, model, parallel.tp)
    return PolicyStage(model=gpt, config=config, use_te=use_te, model_cfg=model, parallel=parallel)


def build_policy_like(stage: PolicyStage) -> GPTModel:
    """Another model with the same architecture and layout as ``stage`` (e.g. a frozen reference).

    It gets its own ``TransformerConfig``: the training one carries optimizer hooks.
    """
    config = transformer_config(stage.model_cfg, stage.parallel)
    return _gpt_model(config, stage.use_te, stage.model_cfg, stage.parallel.tp)


def _gpt_model(config, use_te: bool, model: ModelConfig, tp: int) -> GPTModel:
    block_spec = build_block_spec(config, use_te, grouped_experts=model.moe_grouped_experts)
    mtp = dict(mtp_block_spec=build_mtp_block_spec(config, block_spec, use_te)) if model.mtp_num_layers else {}
    gpt = (MTPGPTModel if model.mtp_num_layers else GPTModel)(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=padded_vocab_size(model.vocab_size, tp),
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=bool(model.tie_word_embeddings),
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        # Llama-3.1 frequency scaling (megatron: low/high frequency factors 1/4, original context 8192)
        rope_scaling=model.rope_type == "llama3",
        rope_scaling_factor=model.rotary_scaling_factor or 8.0,
        **mtp,
    )
    if config.moe_enable_routing_replay:
        routing_replay.install(gpt)
    return gpt
