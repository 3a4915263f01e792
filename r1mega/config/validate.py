"""Cross-field checks of an ``R1Config`` with megatron-core semantics, run before any process group.

megatron-core reports a bad layout as an assert deep inside model construction on every rank, often
after minutes of start-up. These checks state the same rules up front, collect every violation and
raise one ``ConfigError`` that says what to change. No torch or megatron import: this module must
run on a login node.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Optional

from r1mega.config import pipeline_split
from r1mega.config.errors import ConfigError
from r1mega.config.presets import is_dense_preset, resolve_model
from r1mega.config.schema import (
    CodeSandboxConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    R1Config,
    RolloutConfig,
    TrainerConfig,
)

PRECISIONS = ("fp32", "bf16", "fp8")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")  # == platform.optional.FP8_RECIPES (tested)
OPTIMIZERS = ("adam", "sgd")
LR_DECAY_STYLES = ("constant", "linear", "cosine")
ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "none")
ROPE_TYPES = ("rope", "yarn", "llama3")
LLAMA3_ORIGINAL_CONTEXT = 8192  # fixed in megatron's llama3 RoPE scaling (rotary_pos_embedding.py)
MTP_PRESETS = ("deepseek_v3", "glm4_moe")  # families whose checkpoints carry multi-token prediction layers
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Names registered in r1mega.rl (listed here because config must not import torch; a test keeps
# them equal to the registries).
ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
POLICY_LOSS_NAMES = ("ppo", "gspo")
KL_ESTIMATOR_NAMES = ("k1", "k2", "k3")
LOSS_AGG_MODE_NAMES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
REFILL_POLICY_NAMES = ("resample", "duplicate", "none")
STAGE_KINDS = ("sft", "grpo", "rejection_sampling", "distill")
BENCHMARK_KINDS = ("math", "choice", "code")  # r1mega.data.benchmarks layouts ("auto": detect)
# Stages share one model and one process layout; what a stage may not override.
STAGE_FIXED_SECTIONS = ("model", "parallel", "stages", "checkpoint")
ROUTING_REPLAY_NAMES = ("none", "r2", "r3")
ROLLOUT_MODES = ("colocated", "one_step_off")
ROLLOUT_ENGINES = ("vllm", "megatron")
# kv_lora_rank + qk_pos_emb_head_dim that vLLM's MLA attention takes (MLACommonBackend.get_supported_head_sizes;
# a test keeps this equal to the installed vLLM's)
VLLM_MLA_HEAD_SIZES = (320, 512, 576)
SANDBOX_FILESYSTEMS = ("auto", "bwrap", "unshare", "none")  # == ("auto", *rewards.sandbox_fs.FILESYSTEMS, "none")
RECOMPUTE_GRANULARITIES = ("selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")

Problems = list[str]


# --------------------------------------------------------------------------- public helpers


def _model_parallel(p: ParallelConfig) -> tuple[int, str, str]:
    """Ranks per data-parallel replica, with its factors' names and values for messages ("tp*pp", "2*1";
    cp appears when it is used)."""
    sizes = [("tp", p.tp)] + [("cp", p.cp)] * (p.cp != 1) + [("pp", p.pp)]
    return (p.tp * p.cp * p.pp, "*".join(n for n, _ in sizes), "*".join(str(v) for _, v in sizes))


def derived_dp(parallel: ParallelConfig, world_size: Optional[int] = None) -> int:
    """Data-parallel size: ``parallel.dp`` if set, else ``world_size // (tp * cp * pp)`` as megatron does."""
    if parallel.dp:
        return parallel.dp
    if world_size is None:
        raise ConfigError(
            "parallel.dp=0 means 'derive from the world size' but no world size is known: "
            "pass world_size or set parallel.dp explicitly"
        )
    model_parallel, names, _ = _model_parallel(parallel)
    if model_parallel < 1 or world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not a multiple of {names}={model_parallel}: "
            f"choose {names} from {_divisors(world_size)}"
        )
    return world_size // model_parallel


def learner_world_size(cfg: R1Config, world_size: Optional[int]) -> Optional[int]:
    """Ranks that train: the launcher's world minus the engine ranks in ``rollout.mode=one_step_off``."""
    if world_size is None or cfg.rollout.mode != "one_step_off":
        return world_size
    learners = world_size - cfg.rollout.engine_ranks
    if learners < 1:
        raise ConfigError(f"world size {world_size} leaves no learner rank after rollout.engine_ranks="
                          f"{cfg.rollout.engine_ranks}: launch more processes or lower rollout.engine_ranks")
    return learners


def effective_sequence_parallel(parallel: ParallelConfig) -> bool:
    """``sequence_parallel=None`` means on whenever tp > 1 (what megatron MoE needs)."""
    if parallel.sequence_parallel is None:
        return parallel.tp > 1
    return parallel.sequence_parallel


def validate_config(cfg: R1Config, world_size: Optional[int] = None) -> None:
    """Check ``cfg`` (and its layout on ``world_size`` ranks, if given); raise one ``ConfigError``.

    Model fields left ``None`` are filled from the preset on a copy first, so the checks see the
    architecture that will actually be built; ``cfg`` itself is not modified.
    """
    problems: Problems = []
    world_size = learner_world_size(cfg, world_size)
    model = _resolved_model(cfg.model, problems)
    parallel = resolve_parallel(cfg.parallel)
    dp = _known_dp(parallel, world_size)
    problems += _check_parallel(parallel, world_size)
    problems += _check_expert_layout(parallel, dp, model)
    problems += _check_model(model)
    problems += _check_model_vs_parallel(model, parallel)
    problems += _check_optimizer(cfg.optimizer)
    problems += _check_trainer(cfg.trainer, parallel, dp, cfg.rl.mini_batches)
    problems += _check_rollout(cfg.rollout)
    problems += _check_misc(cfg)
    problems += _check_stages(cfg)
    problems += _check_routing_replay(cfg, model)
    problems += _check_recompute(parallel, model, cfg.rl.routing_replay)
    problems += _check_rollout_mode(cfg, world_size)
    problems += _check_engine_model(cfg, model)
    problems += _check_distill(cfg)
    if problems:
        raise ConfigError(problems)


def check_sandbox(sb: CodeSandboxConfig) -> Problems:
    """The code sandbox section (``reward.sandbox``): limits in range, a known filesystem builder, and no
    required filesystem view switched off."""
    out = _one_of("reward.sandbox.filesystem", sb.filesystem, SANDBOX_FILESYSTEMS)
    if sb.wall_timeout_s <= 0 or sb.memory_mb < 32 or sb.max_output_bytes < 1:
        out.append("reward.sandbox: wall_timeout_s must be > 0, memory_mb >= 32, max_output_bytes >= 1")
    if sb.filesystem == "none" and sb.require_isolation:
        out.append("reward.sandbox.filesystem=none turns off the private filesystem view that "
                   "reward.sandbox.require_isolation=true requires: use filesystem=auto, or set "
                   "require_isolation=false to let programs see the host's files")
    return out


def check_stage_list(cfg: R1Config) -> None:
    """``r1mega train`` needs at least one stage; raise ``ConfigError`` with an example otherwise."""
    if not cfg.stages:
        raise ConfigError("the config has no stages: add a `stages:` list, e.g. `stages: [{name: rl, kind: grpo}]` "
                          "for R1-Zero (RL from the base model) or cold-start sft -> grpo -> rejection_sampling -> "
                          "sft -> grpo for R1 (see configs/r1_tiny_cpu.yaml)")


# --------------------------------------------------------------------------- small utilities


def _divisors(n: int) -> list[int]:
    """Valid choices for a size that must divide ``n``; shown in messages so the fix is obvious."""
    if n < 1:
        return []
    return [d for d in range(1, n + 1) if n % d == 0]


def _one_of(key: str, value: object, allowed: tuple[str, ...]) -> Problems:
    if value is None or value in allowed:
        return []
    return [f"{key}={value!r} is not supported: choose one of {list(allowed)}"]


def _at_least(key: str, value: Optional[float], low: float, hint: str = "") -> Problems:
    if value is None or value >= low:
        return []
    return [f"{key}={value} must be >= {low}: {hint or f'set it to {low} or more'}"]


def _check_all(checks: list[Callable[[], Problems]]) -> Problems:
    """Run independent checks and concatenate their problems (keeps each check one expression)."""
    out: Problems = []
    for check in checks:
        out += check()
    return out


def _resolved_model(model: ModelConfig, problems: Problems) -> ModelConfig:
    """Preset-filled copy of ``model``; an unknown preset/size becomes a problem, not a crash."""
    try:
        return resolve_model(replace(model))
    except ValueError as exc:
        problems.append(str(exc))
        return model


def _known_dp(parallel: ParallelConfig, world_size: Optional[int]) -> Optional[int]:
    """dp when it can be known without guessing; None when the layout is already inconsistent."""
    if parallel.dp > 0:
        return parallel.dp
    model_parallel = _model_parallel(parallel)[0]
    if world_size is None or model_parallel < 1 or world_size % model_parallel:
        return None
    return world_size // model_parallel or None


# --------------------------------------------------------------------------- parallel layout


def _check_parallel(p: ParallelConfig, world_size: Optional[int]) -> Problems:
    out: Problems = []
    for name, hint in (("tp", "tensor"), ("pp", "pipeline"), ("cp", "context"), ("ep", "expert"),
                       ("etp", "expert tensor")):
        out += _at_least(f"parallel.{name}", getattr(p, name), 1, f"set 1 to disable {hint} parallelism")
    out += _at_least("parallel.dp", p.dp, 0, "set 0 to derive it from the world size")
    out += _at_least("parallel.micro_batch_size", p.micro_batch_size, 1)
    out += _at_least("parallel.max_tokens_per_micro_batch", p.max_tokens_per_micro_batch, 1,
                     "or null to cut micro-batches by parallel.micro_batch_size sequences")
    out += _at_least("parallel.timeout_minutes", p.timeout_minutes, 1)
    if world_size is not None and min(p.tp, p.pp, p.cp) >= 1 and p.dp >= 0:
        out += _check_world_size(p, world_size)
    return out


def _check_world_size(p: ParallelConfig, world_size: int) -> Problems:
    """megatron: world = tp * cp * pp * dp exactly."""
    if world_size < 1:
        return [f"world size {world_size} must be >= 1: launch at least one rank"]
    model_parallel, names, values = _model_parallel(p)
    if world_size % model_parallel:
        fields = " and ".join(f"parallel.{n}" for n in names.split("*"))
        return [
            f"world size {world_size} is not a multiple of {names}={values}={model_parallel}: "
            f"choose {fields} whose product is in {_divisors(world_size)}, "
            f"or launch a multiple of {model_parallel} ranks"
        ]
    if p.dp and model_parallel * p.dp != world_size:
        return [
            f"parallel.{names}*dp = {values}*{p.dp} = {model_parallel * p.dp} but world size is "
            f"{world_size}: set parallel.dp=0 to derive it, or parallel.dp="
            f"{world_size // model_parallel}"
        ]
    return []


def resolve_parallel(p: ParallelConfig) -> ParallelConfig:
    """Fill derived defaults: ``etp=None`` means etp = tp, as in megatron-core."""
    return replace(p, etp=p.tp) if p.etp is None else p


def _check_expert_layout(p: ParallelConfig, dp: Optional[int], m: ModelConfig) -> Problems:
    """megatron carves the expert grid (etp * ep * expert-dp) out of the tp * cp * dp ranks of a stage."""
    if min(p.tp, p.ep, p.etp) >= 1 and m.num_experts and p.ep == 1 and p.etp != p.tp:
        # megatron-core marks expert weights as dense (reduced over the dense DP group only) when
        # ep == 1, so expert-data-parallel copies across TP ranks would never be summed.
        return [f"parallel.etp={p.etp} differs from parallel.tp={p.tp} with parallel.ep=1: expert "
                f"gradients would not be reduced across TP ranks; set parallel.etp={p.tp} (or leave it "
                f"unset), or use parallel.ep>1"]
    if dp is None or min(p.tp, p.ep, p.etp) < 1:
        return []
    dense_ranks, expert_ranks = p.tp * max(p.cp, 1) * dp, p.etp * p.ep
    if dense_ranks % expert_ranks == 0:
        return []
    if dense_ranks % p.etp:
        fix = f"choose parallel.etp from {_divisors(dense_ranks)}"
    else:
        fix = f"choose parallel.ep from {_divisors(dense_ranks // p.etp)}"
    names, values = ("tp*cp*dp", f"{p.tp}*{p.cp}*{dp}") if p.cp != 1 else ("tp*dp", f"{p.tp}*{dp}")
    return [
        f"parallel.etp*ep = {p.etp}*{p.ep} = {expert_ranks} does not divide {names} = {values} = "
        f"{dense_ranks} (experts are sharded over the {names} ranks of each pipeline stage): {fix}"
    ]


# --------------------------------------------------------------------------- model architecture


def _check_model(m: ModelConfig) -> Problems:
    return _check_all([
        lambda: _one_of("model.precision", m.precision, PRECISIONS),
        lambda: _one_of("model.fp8_recipe", m.fp8_recipe, FP8_RECIPES),
        lambda: _check_sizes(m),
        lambda: _check_moe(m),
        lambda: _check_router_groups(m),
        lambda: _check_mla(m),
        lambda: _check_mtp(m),
        lambda: _check_rope(m),
        lambda: _one_of("model.moe_router_score_function", m.moe_router_score_function,
                        ROUTER_SCORE_FUNCTIONS),
        lambda: _one_of("model.moe_router_load_balancing_type", m.moe_router_load_balancing_type,
                        LOAD_BALANCING_TYPES),
        lambda: _one_of("model.activation", m.activation, ("silu", "quick_gelu")),
        lambda: _one_of("model.softmax_type", m.softmax_type, ("vanilla", "off-by-one", "learnable")),
        lambda: _at_least("model.window_size", m.window_size or None, 1),
    ])


def _check_sizes(m: ModelConfig) -> Problems:
    out: Problems = []
    for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
        out += _at_least(f"model.{name}", getattr(m, name), 1)
    heads, groups = m.num_attention_heads, m.num_query_groups
    if heads is not None and groups is not None and heads >= 1:
        if groups < 1 or heads % groups:
            out.append(
                f"model.num_query_groups={m.num_query_groups} does not divide "
                f"model.num_attention_heads={m.num_attention_heads}: choose num_query_groups from "
                f"{_divisors(m.num_attention_heads)}"
            )
    if m.max_position_embeddings is not None and m.seq_length > m.max_position_embeddings:
        out.append(
            f"model.seq_length={m.seq_length} exceeds model.max_position_embeddings="
            f"{m.max_position_embeddings}: lower seq_length or raise max_position_embeddings"
        )
    return out


def _check_moe(m: ModelConfig) -> Problems:
    if m.num_experts is None:
        return []
    if m.num_experts < 1:
        return [f"model.num_experts={m.num_experts} must be >= 1: set null for a dense model"]
    out: Problems = []
    if m.moe_router_topk is not None and not 1 <= m.moe_router_topk <= m.num_experts:
        out.append(
            f"model.moe_router_topk={m.moe_router_topk} must be between 1 and model.num_experts="
            f"{m.num_experts}: lower moe_router_topk or add experts"
        )
    dense = m.first_k_dense_layers
    if dense is not None and dense < 0:
        out.append(f"model.first_k_dense_layers={dense} must be >= 0: set 0 for an all-MoE stack")
    elif dense is not None and m.num_layers is not None and m.num_layers <= dense:
        out.append(
            f"model.num_layers={m.num_layers} must exceed model.first_k_dense_layers={dense} "
            f"(no MoE layer would remain): lower first_k_dense_layers or add layers"
        )
    return out


def _check_router_groups(m: ModelConfig) -> Problems:
    """Group-limited routing (DeepSeek-V3): top-k is taken inside the best ``group_topk`` groups."""
    groups, group_topk = m.moe_router_num_groups, m.moe_router_group_topk
    if groups is None or m.num_experts is None or m.num_experts < 1:
        return []
    if groups < 1 or m.num_experts % groups:
        return [
            f"model.moe_router_num_groups={groups} does not divide model.num_experts="
            f"{m.num_experts}: choose moe_router_num_groups from {_divisors(m.num_experts)}"
        ]
    if group_topk is None or not 1 <= group_topk <= groups:
        return [
            f"model.moe_router_group_topk={group_topk} must be between 1 and "
            f"model.moe_router_num_groups={groups}: set it in that range"
        ]
    reachable = group_topk * (m.num_experts // groups)
    if m.moe_router_topk is not None and m.moe_router_topk > reachable:
        return [
            f"model.moe_router_topk={m.moe_router_topk} exceeds the {reachable} experts in the top "
            f"{group_topk} groups: raise moe_router_group_topk or lower moe_router_topk"
        ]
    return []


def _check_mla(m: ModelConfig) -> Problems:
    if not m.multi_latent_attention:
        return []
    needed = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
    missing = [n for n in needed if getattr(m, n) is None or getattr(m, n) < (0 if n == "q_lora_rank" else 1)]
    if not missing:
        return []
    return [
        f"model.multi_latent_attention=true needs {', '.join('model.' + n for n in missing)} "
        f"set to positive sizes (q_lora_rank 0: no q compression): set them, or use a preset that defines "
        f"them (deepseek_v3, deepseek_v2)"
    ]


def _check_mtp(m: ModelConfig) -> Problems:
    out = _at_least("model.mtp_num_layers", m.mtp_num_layers, 0)
    out += _at_least("model.mtp_loss_scale", m.mtp_loss_scale, 0)
    if m.mtp_num_layers and m.preset not in MTP_PRESETS:
        out.append(f"model.mtp_num_layers={m.mtp_num_layers} with preset {m.preset}: r1mega carries multi-token "
                   f"prediction layers for {', '.join(MTP_PRESETS)} (their checkpoints have them); set "
                   "model.mtp_num_layers=0")
    if (m.mtp_loss_scale or 0) > 0 and not m.mtp_num_layers:
        out.append(f"model.mtp_loss_scale={m.mtp_loss_scale} without MTP layers: set model.mtp_num_layers "
                   "(DeepSeek-V3: 1) or model.mtp_loss_scale=0")
    return out


def _check_rope(m: ModelConfig) -> Problems:
    out = _one_of("model.rope_type", m.rope_type, ROPE_TYPES)
    if m.rotary_percent is not None and not 0 < m.rotary_percent <= 1:
        out.append(f"model.rotary_percent={m.rotary_percent} must be in (0, 1] (the share of each head's dims "
                   "that rotary covers; GLM-4.5: 0.5)")
    elif m.rotary_percent not in (None, 1.0) and m.multi_latent_attention:
        out.append(f"model.rotary_percent={m.rotary_percent} with multi_latent_attention: MLA has its own rope "
                   "dims (model.qk_pos_emb_head_dim); unset model.rotary_percent")
    if m.rope_type == "llama3":
        if m.original_max_position_embeddings != LLAMA3_ORIGINAL_CONTEXT:
            out.append(f"model.original_max_position_embeddings={m.original_max_position_embeddings} with "
                       f"rope_type=llama3: megatron's llama3 scaling fixes the original context to "
                       f"{LLAMA3_ORIGINAL_CONTEXT}; set it to {LLAMA3_ORIGINAL_CONTEXT}")
        if m.rotary_scaling_factor is None or m.rotary_scaling_factor < 1:
            out.append(f"model.rotary_scaling_factor={m.rotary_scaling_factor} with rope_type=llama3 must be >= 1 "
                       f"(Llama-3.1: 8, Llama-3.2: 32)")
    return out


def _check_model_vs_parallel(m: ModelConfig, p: ParallelConfig) -> Problems:
    if min(p.tp, p.pp, p.cp, p.ep, p.etp) < 1:
        return []  # already reported; divisibility by a non-positive size is meaningless
    return _check_all([
        lambda: _check_tp_split(m, p),
        lambda: _check_pipeline_split(m, p),
        lambda: _check_experts_vs_ep(m, p),
        lambda: _check_sequence_parallel(m, p),
        lambda: _check_context_parallel(m, p),
        lambda: _check_biased_experts(m, p),
    ])


def _check_biased_experts(m: ModelConfig, p: ParallelConfig) -> Problems:
    """megatron-core supports biases on expert linears (add_bias_linear, gpt-oss) only unsplit over TP."""
    if m.add_bias_linear and m.num_experts and p.etp > 1:
        return [f"parallel.etp={p.etp} with model.add_bias_linear=true (biased experts, {m.preset}): megatron-core "
                "supports expert biases only with expert tensor parallelism 1; set parallel.etp=1"]
    return []


def _must_divide(key: str, value: Optional[int], size_key: str, size: int) -> Problems:
    """One '<size> does not divide <value>' problem with the valid choices of the size."""
    if value is None or size <= 1 or value % size == 0:
        return []
    return [f"{size_key}={size} does not divide {key}={value}: choose {size_key.split('.')[-1]} "
            f"from {_divisors(value)}"]


def _check_tp_split(m: ModelConfig, p: ParallelConfig) -> Problems:
    """Heads, KV groups and MLP columns are split across tensor-parallel ranks."""
    tp = ("parallel.tp", p.tp)
    return (
        _must_divide("model.num_attention_heads", m.num_attention_heads, *tp)
        + _must_divide("model.num_query_groups", m.num_query_groups, *tp)
        + _must_divide("model.ffn_hidden_size", m.ffn_hidden_size, *tp)
        + _must_divide("model.moe_shared_expert_intermediate_size",
                       m.moe_shared_expert_intermediate_size, *tp)
        # routed experts are split by the expert-tensor-parallel size, not tp
        + _must_divide("model.moe_ffn_hidden_size",
                       m.moe_ffn_hidden_size if m.num_experts else None, "parallel.etp", p.etp)
    )


def _check_pipeline_split(m: ModelConfig, p: ParallelConfig) -> Problems:
    """The layers must split over the stages as megatron builds them (``config/pipeline_split``)."""
    first, last = p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage
    if m.num_layers is None or m.num_layers < 1:
        return []
    problem = pipeline_split.split_problem(m.num_layers, p.pp, first, last)
    if problem is None:
        return []
    keys = ("parallel.num_layers_in_first_pipeline_stage", "parallel.num_layers_in_last_pipeline_stage")
    fixes = [" ".join(f"{k}={v}" for k, v in zip(keys, pair) if v is not None)
             for pair in pipeline_split.suggest(m.num_layers, p.pp, first, last)]
    fix = f"set {' or '.join(fixes)}" if fixes else "choose another parallel.pp"
    if first is None and last is None:
        return [f"model.num_layers={m.num_layers} is not divisible by parallel.pp={p.pp}: choose pp "
                f"from {_divisors(m.num_layers)}, or split unevenly: {fix}"]
    if p.pp == 1:
        fix = f"unset {' and '.join(k for k, v in zip(keys, (first, last)) if v is not None)} (pp=1 has one stage)"
    edges = ", ".join(f"{name} stage {v}" for name, v in (("first", first), ("last", last)) if v is not None)
    return [f"uneven pipeline split of model.num_layers={m.num_layers} over parallel.pp={p.pp} ({edges}): "
            f"{problem}; {fix}"]


def _check_experts_vs_ep(m: ModelConfig, p: ParallelConfig) -> Problems:
    if is_dense_preset(m.preset) and p.ep > 1 and not m.num_experts:
        return [f"parallel.ep={p.ep} with model.preset={m.preset!r}: a dense model has no experts to shard; "
                f"set parallel.ep=1 (use tp, pp or dp instead)"]
    if m.num_experts is None:
        if p.ep > 1:
            return [f"parallel.ep={p.ep} needs an MoE model but model.num_experts is unset: "
                    f"set parallel.ep=1 or model.num_experts"]
        return []
    if m.num_experts < 1 or m.num_experts % p.ep == 0:
        return []
    return [
        f"model.num_experts={m.num_experts} is not divisible by parallel.ep={p.ep}: choose ep from "
        f"{_divisors(m.num_experts)}"
    ]


def _check_sequence_parallel(m: ModelConfig, p: ParallelConfig) -> Problems:
    out: Problems = []
    if p.sequence_parallel is False and p.tp > 1 and m.num_experts:
        out.append(
            f"parallel.sequence_parallel=false with parallel.tp={p.tp} on an MoE model: megatron-core "
            f"MoE needs sequence parallelism when tp > 1; set parallel.sequence_parallel=true "
            f"(or null to follow tp)"
        )
    if effective_sequence_parallel(p) and p.tp > 1 and p.cp == 1 and m.seq_length % p.tp:
        out.append(
            f"model.seq_length={m.seq_length} is not divisible by parallel.tp={p.tp} (sequence "
            f"parallelism splits the sequence over tp ranks): use a multiple of {p.tp}"
        )
    return out


def _check_context_parallel(m: ModelConfig, p: ParallelConfig) -> Problems:
    """megatron's CP layout cuts every sequence into 2*cp equal chunks; with sequence parallelism each
    rank's share is split again over tp."""
    if p.cp == 1:
        return []
    multiple = math.lcm(2 * p.cp, p.cp * p.tp) if effective_sequence_parallel(p) and p.tp > 1 else 2 * p.cp
    if m.seq_length % multiple:
        why = "2*cp" if multiple == 2 * p.cp else "2*cp, and its 1/cp share by tp (sequence parallelism)"
        return [f"model.seq_length={m.seq_length} is not divisible by {multiple} (parallel.cp={p.cp} splits every "
                f"sequence into {why}): use a multiple of {multiple}, e.g. {-(-m.seq_length // multiple) * multiple}"]
    return []


# --------------------------------------------------------------------------- training sections


def _check_optimizer(o: OptimizerConfig) -> Problems:
    out = _one_of("optimizer.name", o.name, OPTIMIZERS)
    out += _one_of("optimizer.lr_decay_style", o.lr_decay_style, LR_DECAY_STYLES)
    if not o.lr > 0:
        out.append(f"optimizer.lr={o.lr} must be > 0: set a positive learning rate such as 1e-6")
    if not 0 <= o.min_lr <= max(o.lr, 0):
        out.append(f"optimizer.min_lr={o.min_lr} must be in [0, optimizer.lr={o.lr}]: lower it")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(o, name) < 1:
            out.append(f"optimizer.{name}={getattr(o, name)} must be in [0, 1): e.g. 0.9 or 0.95")
    if not o.adam_eps > 0:
        out.append(f"optimizer.adam_eps={o.adam_eps} must be > 0: e.g. 1e-8")
    out += _at_least("optimizer.weight_decay", o.weight_decay, 0)
    out += _at_least("optimizer.clip_grad", o.clip_grad, 0, "set 0 to disable clipping")
    out += _at_least("optimizer.warmup_steps", o.warmup_steps, 0)
    return out


def _check_trainer(t: TrainerConfig, p: ParallelConfig, dp: Optional[int], mini_batches: int = 1) -> Problems:
    """Sizes, and that the global batch (the rollout batch of an RL step) cuts into ``rl.mini_batches``
    mini-batches that split over the DP ranks (and into micro-batches of ``micro_batch_size`` sequences
    unless micro-batches are cut by tokens)."""
    out = _at_least("trainer.steps", t.steps, 0)
    out += _at_least("trainer.global_batch_size", t.global_batch_size, 1)
    out += _at_least("trainer.log_interval", t.log_interval, 1)
    out += _at_least("trainer.eval_interval", t.eval_interval, 0, "set 0 to disable evaluation")
    if dp is None or p.micro_batch_size < 1 or t.global_batch_size < 1 or mini_batches < 1:
        return out
    by_tokens = p.max_tokens_per_micro_batch is not None  # micro-batches by tokens: only the DP split must be even
    per_step = mini_batches * dp * (1 if by_tokens else p.micro_batch_size)
    if t.global_batch_size % per_step:
        lower = max(per_step, t.global_batch_size // per_step * per_step)
        parts = ["rl.mini_batches"] * (mini_batches > 1) + ["dp"] + ["micro_batch_size"] * (not by_tokens)
        sizes = [mini_batches] * (mini_batches > 1) + [dp] + [p.micro_batch_size] * (not by_tokens)
        out.append(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by "
            f"{'*'.join(parts)} = {'*'.join(map(str, sizes))} = {per_step}: use a multiple of "
            f"{per_step} (e.g. {lower} or {lower + per_step})"
            + ("" if by_tokens else " or change parallel.micro_batch_size")
        )
    return out


def _check_rollout(r: RolloutConfig) -> Problems:
    out: Problems = []
    if not r.temperature > 0:
        out.append(f"rollout.temperature={r.temperature} must be > 0: use 1.0 for RL sampling")
    if not 0 < r.top_p <= 1:
        out.append(f"rollout.top_p={r.top_p} must be in (0, 1]: use 1.0 to disable nucleus sampling")
    if r.top_k != -1 and r.top_k < 1:
        out.append(f"rollout.top_k={r.top_k} must be -1 (disabled) or >= 1")
    if not 0 < r.gpu_memory_utilization <= 1:
        out.append(f"rollout.gpu_memory_utilization={r.gpu_memory_utilization} must be in (0, 1]")
    out += _at_least("rollout.n", r.n, 1, "GRPO needs at least one sample per prompt")
    out += _at_least("rollout.max_new_tokens", r.max_new_tokens, 1)
    out += _at_least("rollout.tp", r.tp, 1)
    out += _one_of("rollout.engine", r.engine, ROLLOUT_ENGINES)
    if r.engine == "megatron":
        if r.tp != 1:
            out.append(f"rollout.tp={r.tp} sizes vLLM engines; rollout.engine=megatron generates in the learner's own "
                       f"layout (parallel.tp / pp / ep): set rollout.tp=1")
        if r.stop:
            out.append(f"rollout.stop={list(r.stop)}: rollout.engine=megatron stops on token ids only (it does not "
                       f"detokenize every step): use rollout.stop_token_ids, or rollout.engine=vllm")
    if r.engine_call_timeout_s is not None and not r.engine_call_timeout_s > 0:
        out.append(f"rollout.engine_call_timeout_s={r.engine_call_timeout_s} must be > 0 seconds, "
                   "or null for no limit")
    return out


def _stage_layers(m: ModelConfig, p: ParallelConfig) -> Optional[list[int]]:
    """Transformer layers per pipeline stage, or None when the split is invalid (reported elsewhere)."""
    if m.num_layers is None or p.pp < 1:
        return None
    first, last = p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage
    edges = [v for v in (first, last) if v is not None]
    middle_stages, middle = p.pp - len(edges), m.num_layers - sum(edges)
    if middle_stages < 0 or middle < 0 or (middle_stages == 0 and middle) or (middle_stages and middle % middle_stages):
        return None
    mid = [middle // middle_stages] * middle_stages if middle_stages else []
    return [first] * (first is not None) + mid + [last] * (last is not None)


def _check_recompute(p: ParallelConfig, m: ModelConfig, routing_replay: str) -> Problems:
    """megatron's rules for activation recompute (TransformerConfig.__post_init__), stated up front."""
    gran, method, n = p.recompute_granularity, p.recompute_method, p.recompute_num_layers
    out = _one_of("parallel.recompute_granularity", gran, RECOMPUTE_GRANULARITIES)
    out += _one_of("parallel.recompute_method", method, RECOMPUTE_METHODS)
    if out:
        return out
    if gran != "full":
        for key, value in (("recompute_method", method), ("recompute_num_layers", n)):
            if value is not None:
                out.append(f"parallel.{key}={value!r} only applies to parallel.recompute_granularity=full (got "
                           f"{gran!r}): unset it, or set recompute_granularity=full")
    else:
        stages = _stage_layers(m, p)
        if method is None:
            out.append("parallel.recompute_granularity=full needs parallel.recompute_method: uniform (every layer, "
                       "in chunks of recompute_num_layers) or block (the first recompute_num_layers of each stage)")
        if n is None or n < 1:
            out.append(f"parallel.recompute_granularity=full needs parallel.recompute_num_layers >= 1 (got {n}): "
                       f"e.g. 1")
        elif stages and n > max(stages):
            out.append(f"parallel.recompute_num_layers={n} exceeds the {max(stages)} layers of a pipeline stage: "
                       f"choose 1..{max(stages)}")
        elif stages and method == "uniform" and any(s % n for s in stages):
            out.append(f"parallel.recompute_num_layers={n} with recompute_method=uniform must divide the layers of "
                       f"every pipeline stage {stages}: choose one of "
                       f"{[d for d in _divisors(min(stages)) if all(s % d == 0 for s in stages)]}")
    if gran is not None and routing_replay != "none":
        out.append(f"parallel.recompute_granularity={gran!r} with rl.routing_replay={routing_replay!r}: a recomputed "
                   f"forward would replay a later micro-batch's routing; unset recompute or set rl.routing_replay=none")
    return out


def _check_routing_replay(cfg: R1Config, model: Optional[ModelConfig]) -> Problems:
    mode = cfg.rl.routing_replay
    out = _one_of("rl.routing_replay", mode, ROUTING_REPLAY_NAMES)
    if out or mode == "none":
        return out
    if model is not None and model.num_experts == 0:
        out.append(f"rl.routing_replay={mode!r} needs an MoE model (model.num_experts > 0): set rl.routing_replay=none")
    if mode == "r3" and not cfg.rollout.return_routed_experts:
        out.append("rl.routing_replay='r3' replays the engine's expert choices: set rollout.return_routed_experts=true")
    return out


def check_stage_token_budget(cfg: R1Config, kind: str) -> Problems:
    """A GRPO stage's token-budget micro-batch must hold its longest sample (the longest prompt plus the
    longest response), as ``rl.batching.micro_batch_plan`` packs it: its predicted positions rounded up to
    2*cp chunks, shared by the cp ranks. Checked before any process starts, not after the first rollout."""
    budget, cp = cfg.parallel.max_tokens_per_micro_batch, max(cfg.parallel.cp, 1)
    if kind != "grpo" or budget is None or budget < 1:
        return []
    longest = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    chunks = 2 * cp if cp > 1 else 1
    packed = math.ceil((longest - 1) / chunks) * chunks  # its predicted positions in whole chunks
    need = math.ceil(packed / cp)
    if budget >= need:
        return []
    over_cp = f" over cp={cp}" if cp > 1 else ""
    return [f"parallel.max_tokens_per_micro_batch={budget} cannot hold the longest sample, "
            f"data.max_prompt_length + rollout.max_new_tokens = {cfg.data.max_prompt_length} + "
            f"{cfg.rollout.max_new_tokens} tokens{over_cp}: raise it to at least {need}, or shorten the prompts "
            f"or responses"]


def generates(cfg: R1Config) -> bool:
    """Whether a run samples its policy with the rollout engine: a GRPO or rejection-sampling stage, or evals."""
    return bool(cfg.data.eval_path) or any(st.kind in ("grpo", "rejection_sampling") for st in cfg.stages)


def _check_engine_model(cfg: R1Config, m: ModelConfig) -> Problems:
    """A policy the vLLM engine cannot build is refused before any stage runs (vLLM would fail at its first
    generation, after the stages before it)."""
    if cfg.rollout.engine != "vllm" or not generates(cfg) or not m.multi_latent_attention:
        return []
    head = (m.kv_lora_rank or 0) + (m.qk_pos_emb_head_dim or 0)
    if head in VLLM_MLA_HEAD_SIZES:
        return []
    return [f"model.kv_lora_rank + model.qk_pos_emb_head_dim = {head}: vLLM's MLA attention takes "
            f"{' / '.join(map(str, VLLM_MLA_HEAD_SIZES))} (DeepSeek's 512 + 64): use rollout.engine=megatron "
            "(generation in the learner) or such sizes"]


def _check_rollout_mode(cfg: R1Config, world_size: Optional[int] = None) -> Problems:
    r = cfg.rollout
    out = _one_of("rollout.mode", r.mode, ROLLOUT_MODES)
    if world_size and r.mode == "colocated" and world_size > r.tp and r.tp >= 1 and world_size % r.tp:
        out.append(f"rollout.tp={r.tp} does not divide the world size {world_size}: every rollout-TP group of "
                   f"learner ranks runs one engine; choose rollout.tp in {_divisors(world_size)}")
    if r.sleep_level not in (1, 2):
        out.append(f"rollout.sleep_level={r.sleep_level} is not supported: choose 1 (free the KV cache, keep the "
                   "weights in CPU memory) or 2 (also drop the weights; the next refit pushes them)")
    distills = [st.name for st in cfg.stages if st.kind == "distill"]
    if r.engine == "megatron" and distills:
        out.append(f"stage(s) {distills} (distill) sample a teacher given as an HF model, which "
                   f"rollout.engine=megatron cannot serve (it generates with the learner's own model): run the "
                   f"distill stages with rollout.engine=vllm (a recipe of their own)")
    if out or r.mode == "colocated":
        return out
    if r.engine == "megatron":
        return ["rollout.mode=one_step_off samples on engine ranks of their own from weights pushed to them, while "
                "rollout.engine=megatron generates with the learner's own parameters on the learner ranks (all of "
                "them, between updates): it cannot sample a step ahead. Use rollout.mode=colocated with it, or "
                "rollout.engine=vllm for one_step_off"]
    out += _at_least("rollout.engine_ranks", r.engine_ranks, 1, "one_step_off runs engines on their own ranks")
    out += _at_least("rollout.max_staleness", r.max_staleness, 1, "one_step_off samples are one step stale")
    prompts = max(1, cfg.trainer.global_batch_size // max(r.n, 1))  # a GRPO step's prompts (train/stages.py)
    if r.engine_ranks > prompts:
        out.append(f"rollout.engine_ranks={r.engine_ranks} is more than the {prompts} prompt(s) of a step "
                   f"(trainer.global_batch_size / rollout.n): every engine samples a share of the step's prompts; "
                   f"lower rollout.engine_ranks or raise trainer.global_batch_size")
    if cfg.rl.tis_cap is None:
        out.append("rollout.mode=one_step_off trains on samples from the previous policy, corrected with "
                   "truncated IS: set rl.tis_cap (e.g. 2.0)")
    # what the engine ranks do not serve, refused before any stage runs
    other = [f"{st.name} ({st.kind})" for st in cfg.stages if st.kind != "grpo"]
    if other:
        out.append(f"rollout.mode=one_step_off: the engine ranks serve GRPO stages only, but the recipe has "
                   f"{', '.join(other)}: run those stages colocated (a recipe of their own) or drop them")
    if cfg.data.eval_path:
        out.append("rollout.mode=one_step_off: evals need an engine on the learner ranks; unset data.eval_path "
                   "(evaluate the stage's checkpoint with `r1mega eval` instead)")
    if cfg.rl.drop_uniform_groups and cfg.rl.refill_policy == "resample":
        out.append("rollout.mode=one_step_off samples a step ahead and cannot generate more for DAPO's refill: "
                   "set rl.refill_policy=duplicate or none, or rl.drop_uniform_groups=false")
    return out


def _check_misc(cfg: R1Config) -> Problems:
    out = _one_of("logging.level", cfg.logging.level, LOG_LEVELS)
    out += _at_least("data.max_prompt_length", cfg.data.max_prompt_length, 1)
    out += _at_least("reward.num_workers", cfg.reward.num_workers, 0)
    out += check_sandbox(cfg.reward.sandbox)
    out += _at_least("checkpoint.save_interval", cfg.checkpoint.save_interval, 0,
                     "set 0 to disable periodic saves")
    out += _at_least("checkpoint.keep_last", cfg.checkpoint.keep_last, 0, "set 0 to keep every checkpoint")
    if not cfg.checkpoint.resume:
        out.append("checkpoint.resume is empty: use auto (latest checkpoint in checkpoint.save_dir if any), "
                   "none (start afresh) or the path of a checkpoint to resume from")
    return out + _check_rl(cfg.rl) + _check_eval(cfg.eval)


def _check_stages(cfg: R1Config) -> Problems:
    """Each stage: a known kind, a unique file-system-safe name, data it can read, sane sizes."""
    import re

    out: Problems = []
    seen: set[str] = set()
    rejection_before = False
    for i, st in enumerate(cfg.stages):
        key = f"stages[{i}]"
        if not st.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", st.name):
            out.append(f"{key}.name={st.name!r} must be a non-empty name of letters, digits, '_', '-' or '.' "
                       f"(it names the stage's checkpoint directory)")
        elif st.name in seen:
            out.append(f"{key}.name={st.name!r} is used twice: give every stage a unique name")
        seen.add(st.name)
        out += _one_of(f"{key}.kind", st.kind, STAGE_KINDS)
        if st.steps is not None:
            out += _at_least(f"{key}.steps", st.steps, 1, "or leave it unset for trainer.steps")
        if st.lr is not None and not st.lr > 0:
            out.append(f"{key}.lr={st.lr} must be > 0, or unset for optimizer.lr")
        out += _at_least(f"{key}.samples_per_prompt", st.samples_per_prompt, 1)
        out += _at_least(f"{key}.max_per_prompt", st.max_per_prompt, 1)
        out += _at_least(f"{key}.max_prompts", st.max_prompts, 0, "set 0 to use every prompt")
        if not 0 <= st.min_language <= 1:
            out.append(f"{key}.min_language={st.min_language} must be in [0, 1] (0 turns the check off)")
        needs_data = not (st.kind == "sft" and rejection_before)
        if needs_data and not st.data and not cfg.data.train_path:
            what = "SFT demonstrations (chat records ending with the assistant reply)" if st.kind == "sft" \
                else "prompts with reference answers"
            out.append(f"{key} ({st.kind}) has no data: set {key}.data or data.train_path to a JSONL of {what} "
                       f"(or synthetic:addition for a CPU try-out)")
        rejection_before = rejection_before or st.kind == "rejection_sampling"
        for item in st.overrides:
            section = str(item).partition("=")[0].strip().split(".")[0]
            if section in STAGE_FIXED_SECTIONS:
                out.append(f"{key}.overrides: {item!r} changes {section!r}, which all stages share: set it at the "
                           f"top level (the model, layout and checkpoints are the same for the whole recipe)")
    return out


def _check_distill(cfg: R1Config) -> Problems:
    """Only for recipes with a distill stage: one teacher, its tokenizer, sane top-k / KL / chunk knobs."""
    if not any(st.kind == "distill" for st in cfg.stages):
        return []
    d, out = cfg.distill, []
    if bool(d.teacher_hf) == bool(d.teacher_checkpoint):
        out.append("a distill stage needs exactly one teacher: set distill.teacher_hf (an HF model directory) or "
                   "distill.teacher_checkpoint (an r1mega checkpoint)")
    if d.teacher_checkpoint and not cfg.data.tokenizer:
        out.append("distill.teacher_checkpoint needs data.tokenizer: point it at the tokenizer the teacher was "
                   "trained with (e.g. <teacher run>/tokenizer); the student must use the same one")
    if not 0 <= d.top_logprobs <= 20:
        out.append(f"distill.top_logprobs={d.top_logprobs} must be in [0, 20] (vLLM's max_logprobs); 0 = no logit "
                   f"distillation")
    if d.kl_coef < 0 or (d.kl_coef > 0 and d.top_logprobs == 0):
        out.append(f"distill.kl_coef={d.kl_coef} must be >= 0, and > 0 needs distill.top_logprobs >= 1 (the teacher "
                   f"log-probs the KL is taken over)")
    out += _at_least("distill.chunk_prompts", d.chunk_prompts, 1)
    out += _at_least("distill.max_chunks", d.max_chunks, 0, "set 0 to generate every chunk in one run")
    out += _at_least("distill.max_response_tokens", d.max_response_tokens, 0, "set 0 for no cap")
    if cfg.rollout.seed is None:
        out.append("rollout.seed=null: resumable teacher generation needs a fixed seed (e.g. rollout.seed=0)")
    return out


def _check_eval(e) -> Problems:
    out = _at_least("eval.k", e.k, 1, "pass@1 needs at least one sample per problem")
    out += _at_least("eval.max_prompts", e.max_prompts, 0, "set 0 to evaluate the whole set")
    if e.temperature is not None and not e.temperature > 0:
        out.append(f"eval.temperature={e.temperature} must be > 0 (R1 samples at 0.6), or null for "
                   f"rollout.temperature")
    if e.top_p is not None and not 0 < e.top_p <= 1:
        out.append(f"eval.top_p={e.top_p} must be in (0, 1], or null for rollout.top_p")
    if e.max_new_tokens is not None:
        out += _at_least("eval.max_new_tokens", e.max_new_tokens, 1)
    return out + check_benchmarks(e.benchmarks, "eval.benchmarks")


def check_benchmarks(benchmarks, where: str = "eval.benchmarks") -> Problems:
    """Unique file-name-safe names, a path, a known kind, k >= 1 (``--benchmarks`` is checked the same way)."""
    import re

    out: Problems = []
    seen: set[str] = set()
    for i, b in enumerate(benchmarks):
        key = f"{where}[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", b.name or ""):
            out.append(f"{key}.name={b.name!r} must be a non-empty name of letters, digits, '_', '-' or '.' "
                       f"(it names the benchmark's samples file)")
        elif b.name in seen:
            out.append(f"{key}.name={b.name!r} is used twice: give every benchmark a unique name")
        seen.add(b.name)
        if not b.path:
            out.append(f"{key}.path is empty: point it at a local .jsonl or .json file")
        out += _one_of(f"{key}.kind", b.kind, BENCHMARK_KINDS + ("auto",))
        if b.k is not None:
            out += _at_least(f"{key}.k", b.k, 1, "or leave it unset for eval.k")
        out += _at_least(f"{key}.max_problems", b.max_problems, 0, "set 0 for eval.max_prompts")
    return out


def _check_rl(rl) -> Problems:
    out = _one_of("rl.advantage_estimator", rl.advantage_estimator, ADVANTAGE_ESTIMATORS)
    out += _one_of("rl.policy_loss", rl.policy_loss, POLICY_LOSS_NAMES)
    out += _one_of("rl.kl_estimator", rl.kl_estimator, KL_ESTIMATOR_NAMES)
    out += _one_of("rl.loss_agg_mode", rl.loss_agg_mode, LOSS_AGG_MODE_NAMES)
    out += _one_of("rl.refill_policy", rl.refill_policy, REFILL_POLICY_NAMES)
    out += _at_least("rl.kl_coef", rl.kl_coef, 0.0)
    out += _at_least("rl.eps_clip_low", rl.eps_clip_low, 0.0)
    out += _at_least("rl.eps_clip_high", rl.eps_clip_high, 0.0)
    if rl.tis_cap is not None and rl.tis_cap <= 0:
        out.append(f"rl.tis_cap={rl.tis_cap} must be > 0 (e.g. 2.0), or null to disable truncated IS")
    out += _at_least("rl.mini_batches", rl.mini_batches, 1, "set 1 for one optimizer step per rollout batch")
    out += _at_least("rl.epochs", rl.epochs, 1, "set 1 for one pass over each rollout batch")
    if rl.dual_clip_c is not None and rl.dual_clip_c <= 1:
        out.append(f"rl.dual_clip_c={rl.dual_clip_c} must be > 1 (dual-clip PPO uses c = 3), or null")
    return out
