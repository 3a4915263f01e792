"""Model FLOPs per token of a resolved ``ModelConfig``, term by term (pure Python: no torch, no megatron).

Conventions (the same as megatron-LM's ``num_floating_point_operations`` in ``training/training.py``,
which ``tests/test_flops.py`` re-implements independently and matches):

- a matmul of ``[m, k] x [k, n]`` costs ``2 m k n`` FLOPs (one multiply + one add per FMA);
- per token, a linear layer ``in -> out`` costs ``2 * in * out``;
- causal attention: each query attends to ``s / 2`` keys on average, so the score (``Q K^T``) and
  context (``P V``) matmuls cost ``2 * (s/2) * heads * head_dim`` each per token. The full ``s^2`` count
  would be twice that; megatron (and this module) use ``s / 2``;
- training = forward + backward = 3 x forward (backward = input grad + weight grad, each a forward's
  worth). Full activation recompute runs the forward once more: 4 x forward. These are *hardware*
  FLOPs; MFU uses the model FLOPs (3 x forward) whatever the recompute, as megatron and PaLM do;
- embeddings are a lookup (0 FLOPs); the output layer is a ``hidden -> padded vocab`` matmul; norms,
  rotary, softmax and activation functions are elementwise and not counted, except the MLA latent
  RMSNorms, which megatron counts as ``2 * rank`` per token (kept so the totals agree exactly);
- the MoE router (``hidden -> num_experts`` gating matmul) is reported as its own term ``router``;
  megatron leaves it out, so ``megatron_total`` excludes it (it is < 0.5% for real configs).

Multi-token prediction layers (``model.mtp_num_layers``) are not counted: they run only when trained.

Sliding-window layers (``model.window_size`` w, every layer but each ``window_attn_skip_freq``-th): query i
(1-based) sees ``min(i, w)`` keys; megatron's ``s / 2`` is the exact causal mean ``(s + 1) / 2`` less 1/2,
so windowed layers count their exact mean of ``min(i, w)`` less 1/2 (``s / 2`` when ``w >= s``). Attention
sinks (one more softmax column) and biases are elementwise: not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from r1mega.config.presets import DENSE_PRESETS, resolve_model
from r1mega.config.schema import ModelConfig

VOCAB_PAD_MULTIPLE = 128  # r1mega.models.policy pads the vocabulary to a multiple of lcm(128, tp)

# Dense reference architectures: every size of the dense preset families, named "<family>_<size>"
# (qwen3_8b, llama3_8b, qwen2_7b, ...), plus "tiny" (the tiny Qwen3 dense). The presets are the one source.
DENSE_MODELS: dict[str, tuple[str, str]] = {
    **{f"{family}_{size}": (family, size) for family, sizes in DENSE_PRESETS.items() for size in sizes},
    "tiny": ("qwen3", "tiny"),
}


def dense_model(size: str = "qwen3_8b", **overrides) -> ModelConfig:
    """A dense ``ModelConfig`` (resolved) from the dense presets, e.g. ``qwen3_8b`` or ``llama3_8b``."""
    if size not in DENSE_MODELS:
        raise ValueError(f"dense size {size!r} is unknown; choose one of {sorted(DENSE_MODELS)}")
    preset, preset_size = DENSE_MODELS[size]
    return resolve_model(ModelConfig(preset=preset, size=preset_size, **overrides))


def is_moe(model: ModelConfig) -> bool:
    return bool(model.num_experts)


def padded_vocab(vocab_size: int, tp: int = 1) -> int:
    import math

    multiple = math.lcm(VOCAB_PAD_MULTIPLE, tp)
    return -(-vocab_size // multiple) * multiple


@dataclass
class FlopsBreakdown:
    """Forward FLOPs per token by term (summed over the layers they occur in)."""

    seq_len: int
    terms: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    core_attention_terms: tuple[str, ...] = ()

    def add(self, name: str, value: float, note: str) -> None:
        self.terms[name] = self.terms.get(name, 0.0) + value
        self.notes.setdefault(name, note)

    @property
    def forward(self) -> float:
        return sum(self.terms.values())

    def training(self, recompute: str = "none") -> float:
        """Hardware FLOPs per token of one training step: fwd + bwd (+ recomputed forward)."""
        extra = {"none": 0.0, "full": self.forward,
                 "selective": sum(self.terms[t] for t in self.core_attention_terms)}
        if recompute not in extra:
            raise ValueError(f"recompute={recompute!r}: choose none, selective or full")
        return 3 * self.forward + extra[recompute]

    @property
    def model_flops_per_token(self) -> float:
        """What MFU divides by: 3 x forward, recompute not counted."""
        return self.training("none")

    @property
    def megatron_total(self) -> float:
        """Training FLOPs per token as megatron-LM counts them (no router)."""
        return 3 * (self.forward - self.terms.get("router", 0.0))


def flops_breakdown(model: ModelConfig, seq_len: int, tp: int = 1) -> FlopsBreakdown:
    """Forward FLOPs per token of a model (resolved here if needed) at sequence length ``seq_len``."""
    m = resolve_model(model) if model.num_layers is None else model
    h, L, s = m.hidden_size, m.num_layers, seq_len
    n = m.num_attention_heads
    b = FlopsBreakdown(seq_len=s)

    # ---- attention (every layer)
    if m.multi_latent_attention:
        qk, rope, v = m.qk_head_dim, m.qk_pos_emb_head_dim, m.v_head_dim
        if m.q_lora_rank:
            b.add("attn.q_down", L * 2 * h * m.q_lora_rank, "q down-projection h -> q_lora_rank")
            b.add("attn.q_up", L * 2 * m.q_lora_rank * n * (qk + rope),
                  "q up-projection q_lora_rank -> heads*(qk_head_dim+rope_dim)")
        else:
            b.add("attn.q_proj", L * 2 * h * n * (qk + rope), "q projection h -> heads*(qk_head_dim+rope_dim)")
        b.add("attn.kv_down", L * 2 * h * (m.kv_lora_rank + rope),
              "kv down-projection h -> kv_lora_rank + shared rope key")
        b.add("attn.kv_up", L * 2 * m.kv_lora_rank * n * (qk + v),
              "kv up-projection kv_lora_rank -> heads*(qk_head_dim+v_head_dim)")
        b.add("attn.latent_norms", L * 2 * ((m.q_lora_rank or 0) + m.kv_lora_rank),
              "q/kv latent RMSNorms (megatron counts 2*rank)")
        b.add("attn.scores", L * 2 * (s / 2) * n * (qk + rope), "Q K^T over s/2 causal keys, dim qk+rope")
        b.add("attn.context", L * 2 * (s / 2) * n * v, "P V over s/2 causal keys, dim v_head_dim")
        b.add("attn.out_proj", L * 2 * n * v * h, "output projection heads*v_head_dim -> h")
    else:
        d, g = m.kv_channels, m.num_query_groups or n
        b.add("attn.qkv_proj", L * 2 * h * (n + 2 * g) * d, "QKV projection h -> (heads + 2*groups)*head_dim")
        windowed = windowed_layers(m)
        keys = (L - windowed) * s / 2 + windowed * windowed_keys_per_query(s, m.window_size or s)
        what = f" ({windowed} layers windowed to {m.window_size} keys)" if windowed else ""
        b.add("attn.scores", 2 * keys * n * d, "Q K^T over s/2 causal keys" + what)
        b.add("attn.context", 2 * keys * n * d, "P V over s/2 causal keys" + what)
        b.add("attn.out_proj", L * 2 * n * d * h, "output projection heads*head_dim -> h")
    b.core_attention_terms = ("attn.scores", "attn.context")

    # ---- MLP: dense layers (first_k_dense_layers, or all without experts) and MoE layers
    num_dense = L if not is_moe(m) else min(m.first_k_dense_layers or 0, L)
    num_moe = L - num_dense
    if num_dense:
        b.add("mlp.dense", num_dense * 2 * 3 * h * m.ffn_hidden_size,
              f"SwiGLU MLP (gate, up, down) h -> {m.ffn_hidden_size}, {num_dense} dense layer(s)")
    if num_moe:
        b.add("router", num_moe * 2 * h * m.num_experts, f"gating h -> {m.num_experts} experts (not in megatron)")
        b.add("moe.routed_experts", num_moe * 2 * 3 * h * m.moe_ffn_hidden_size * m.moe_router_topk,
              f"top-{m.moe_router_topk} SwiGLU experts h -> {m.moe_ffn_hidden_size}, {num_moe} MoE layer(s)")
        if m.moe_shared_expert_intermediate_size:
            b.add("moe.shared_experts", num_moe * 2 * 3 * h * m.moe_shared_expert_intermediate_size,
                  f"shared SwiGLU expert h -> {m.moe_shared_expert_intermediate_size}")

    # ---- embedding (lookup) and output layer
    b.add("embedding", 0.0, "lookup, no FLOPs")
    b.add("output_layer", 2 * h * padded_vocab(m.vocab_size, tp),
          f"logits h -> padded vocab {padded_vocab(m.vocab_size, tp)}")
    return b


def windowed_layers(m: ModelConfig) -> int:
    """Layers with sliding-window attention (megatron: layer l, 1-based, unless l % window_attn_skip_freq == 0)."""
    if not m.window_size:
        return 0
    freq = m.window_attn_skip_freq
    return m.num_layers if not freq else sum(1 for layer in range(1, m.num_layers + 1) if layer % freq)


def windowed_keys_per_query(s: int, w: int) -> float:
    """Mean of ``min(i, w)`` over queries i = 1..s, less 1/2 (megatron's causal ``s / 2`` convention)."""
    if w >= s:
        return s / 2
    return (w * (w + 1) / 2 + (s - w) * w) / s - 0.5


def flops_per_token(model: ModelConfig, seq_len: int, recompute: str = "none") -> float:
    """Training FLOPs per token (fwd + bwd [+ recompute])."""
    return flops_breakdown(model, seq_len).training(recompute)


def format_breakdown(b: FlopsBreakdown) -> str:
    fwd = b.forward
    rows = [f"{'term':<22} {'fwd GFLOP/token':>16} {'share':>7}  what"]
    for name, value in b.terms.items():
        rows.append(f"{name:<22} {value / 1e9:>16.4f} {100 * value / fwd:>6.2f}%  {b.notes[name]}")
    rows.append(f"{'forward total':<22} {fwd / 1e9:>16.4f} {100.0:>6.2f}%")
    rows.append(f"{'training (3x fwd)':<22} {b.training() / 1e9:>16.4f}          model FLOPs: MFU uses this")
    rows.append(f"{'+ full recompute':<22} {b.training('full') / 1e9:>16.4f}          4x fwd (hardware FLOPs)")
    rows.append(f"{'megatron formula':<22} {b.megatron_total / 1e9:>16.4f}          3x fwd without the router")
    return "\n".join(rows)


def with_overrides(model: ModelConfig, **overrides) -> ModelConfig:
    return resolve_model(replace(model, **overrides))
