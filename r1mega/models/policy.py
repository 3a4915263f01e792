"""Builds the policy (MoE or dense) as a megatron-core ``GPTModel`` from an r1mega ``ModelConfig``.

All model construction goes through :func:`build_policy`, so a switch of megatron's model class
(newer releases deprecate ``GPTModel`` for ``HybridModel``) is one change here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r1mega.config.pipeline_split import stage_layers
from r1mega.config.schema import ModelConfig, ParallelConfig
from r1mega.models import routing_replay
from r1mega.models.hf_common import yarn_constants
from r1mega.models.layer_spec import build_block_spec, build_mtp_block_spec, use_transformer_engine
from r1mega.models.mtp import MTPGPTModel

from megatron.core import parallel_state  # noqa: E402
from megatron.core.activations import quick_gelu  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.transformer.enums import AttnBackend  # noqa: E402
from megatron.core.transformer.transformer_block import get_num_layers_to_build  # noqa: E402
from megatron.core.transformer.transformer_config import (  # noqa: E402
    MLATransformerConfig,
    TransformerConfig,
)

log = logging.getLogger(__name__)

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
        moe_enable_routing_replay=True,
    )


def _mtp_kwargs(model: ModelConfig) -> dict:
    """Multi-token prediction (megatron's MTP block on the last pipeline stage); none without layers."""
    if not model.mtp_num_layers:
        return {}
    return dict(mtp_num_layers=model.mtp_num_layers, mtp_loss_scaling_factor=float(model.mtp_loss_scale or 0.0))


_ACTIVATIONS = {"silu": F.silu, "quick_gelu": quick_gelu}


def _attention_mlp_kwargs(model: ModelConfig) -> dict:
    """Biases, attention sinks, sliding windows and the gated activation (megatron's own fields)."""
    activation = model.activation or "silu"
    if activation not in _ACTIVATIONS:
        raise ValueError(f"model.activation={activation!r}: use one of {sorted(_ACTIVATIONS)}")
    return dict(
        add_bias_linear=bool(model.add_bias_linear),
        softmax_type=model.softmax_type or "vanilla",
        # HF sliding_window w: a query sees itself and the w - 1 tokens before it
        window_size=(model.window_size - 1, 0) if model.window_size else None,
        window_attn_skip_freq=model.window_attn_skip_freq,
        activation_func=_ACTIVATIONS[activation],
        glu_linear_offset=float(model.glu_linear_offset or 0.0),
        activation_func_clamp_value=model.activation_func_clamp_value,
    )


def _set_yarn(config: TransformerConfig, model: ModelConfig) -> None:
    """YaRN for standard attention: megatron's ``GPTModel`` reads these ``yarn_*`` attributes from the config
    (they are not ``TransformerConfig`` fields in 0.16); MLA takes its own fields."""
    constants = yarn_constants(model)
    config.yarn_rotary_scaling_factor = model.rotary_scaling_factor
    config.yarn_original_max_position_embeddings = model.original_max_position_embeddings
    config.yarn_beta_fast, config.yarn_beta_slow = constants["beta_fast"], constants["beta_slow"]
    config.yarn_mscale, config.yarn_mscale_all_dim = constants["mscale"], constants["mscale_all_dim"]
    config.yarn_correction_range_round_to_int = model.yarn_truncate is not False


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
        add_qkv_bias=bool(model.add_qkv_bias),
        qk_layernorm=bool(model.qk_layernorm),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        # uneven split (megatron's names): first / last stage sizes, the middle stages share the rest
        num_layers_in_first_pipeline_stage=parallel.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=parallel.num_layers_in_last_pipeline_stage,
        context_parallel_size=parallel.cp,
        # TE's CP attention exchanges K/V blocks in a ring; the local SDPAttention all-gathers them itself
        cp_comm_type="p2p" if use_te and parallel.cp > 1 else None,
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
        # activation recompute (parallel.recompute_*; validated in config/validate.py)
        recompute_granularity=parallel.recompute_granularity,
        recompute_method=parallel.recompute_method,
        recompute_num_layers=parallel.recompute_num_layers,
        moe_token_dispatcher_type="alltoall",  # megatron checks it even for dense models (variable lengths)
        **_attention_mlp_kwargs(model),
        **_moe_kwargs(model),
        **_mtp_kwargs(model),
    )
    if not model.multi_latent_attention:
        config = TransformerConfig(**kwargs)
        if model.rope_type == "yarn":
            _set_yarn(config, model)
        return config
    mla = dict(
        multi_latent_attention=True,
        q_lora_rank=model.q_lora_rank or None,  # 0: no q compression
        kv_lora_rank=model.kv_lora_rank,
        qk_head_dim=model.qk_head_dim,
        qk_pos_emb_head_dim=model.qk_pos_emb_head_dim,
        v_head_dim=model.v_head_dim,
        rope_type=model.rope_type or "rope",
        rotary_base=model.rotary_base,
    )
    if model.rope_type == "yarn":
        mla.update(rotary_scaling_factor=model.rotary_scaling_factor,
                   original_max_position_embeddings=model.original_max_position_embeddings, **yarn_constants(model))
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
    no storage and no values. Checkpoint conversion streams tensors through such a model.
    """
    config = transformer_config(model, parallel)
    _check_pipeline_split(config, parallel)
    use_te = use_transformer_engine(model.precision, model.fp8_recipe)
    if not meta:
        gpt = _gpt_model(config, use_te, model, parallel.tp)
    else:
        # megatron allocates on CUDA unless told to initialise on the CPU, where a device context applies.
        # Its initialisation computes nothing on the meta device, but it is where megatron marks each weight's
        # tensor-parallel split (``tensor_model_parallel``, ``partition_dim``), which ``models.sharding``
        # reads: without it a TP>1 model's shards look like whole tensors. At TP1 nothing is split.
        config.use_cpu_initialization = True
        config.perform_initialization = config.tensor_model_parallel_size > 1 or \
            (config.expert_tensor_parallel_size or 1) > 1
        with torch.device("meta"):
            gpt = _gpt_model(config, use_te, model, parallel.tp)
    return PolicyStage(model=gpt, config=config, use_te=use_te, model_cfg=model, parallel=parallel)


def pipeline_stage_layers(config: TransformerConfig) -> list[int]:
    """Transformer layers on each pipeline rank, as megatron builds them (uneven splits included)."""
    return [get_num_layers_to_build(config, pp_rank=r) for r in range(config.pipeline_model_parallel_size)]


def _check_pipeline_split(config: TransformerConfig, parallel: ParallelConfig) -> None:
    """Validation predicted the split from megatron's rules (``config/pipeline_split``); another
    megatron-core version could split differently, and every layer-numbering would then be off."""
    if parallel.pp == 1:
        return
    built = pipeline_stage_layers(config)
    expected = stage_layers(config.num_layers, parallel.pp, parallel.num_layers_in_first_pipeline_stage,
                            parallel.num_layers_in_last_pipeline_stage)
    if built != expected:
        import megatron.core

        raise RuntimeError(f"megatron-core {megatron.core.__version__} builds {built} layers on the pipeline "
                           f"stages but r1mega's validation expects {expected}: update r1mega/config/"
                           f"pipeline_split.py to this version's get_num_layers_to_build")
    if parallel_state.get_pipeline_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0 \
            and parallel_state.get_tensor_model_parallel_rank() == 0:
        log.info("pipeline split: %s layers on the %d stages", "+".join(map(str, built)), parallel.pp)


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
        position_embedding_type="yarn" if model.rope_type == "yarn" and not model.multi_latent_attention else "rope",
        rotary_base=model.rotary_base,
        rotary_percent=model.rotary_percent or 1.0,
        # Llama-3.1 frequency scaling (megatron: low/high frequency factors 1/4, original context 8192)
        rope_scaling=model.rope_type == "llama3",
        rope_scaling_factor=model.rotary_scaling_factor or 8.0,
        **mtp,
    )
    if config.moe_enable_routing_replay:
        routing_replay.install(gpt)
    return gpt
