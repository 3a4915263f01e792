"""Helpers for the rollout tests: a tiny random HF Qwen3-MoE or DeepSeek-V3 directory with a local
tokenizer (head_dim 64: vLLM-CPU needs >= 64), its tensors as refit buckets, and transformers log-probs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 512
TINY_QWEN3 = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                  num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=1024,
                  tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])
# MLA (q and kv latents), a dense first layer, a shared expert, sigmoid routing with the score-correction
# bias. vLLM-CPU's MLA backend only takes kv_lora_rank + qk_rope_head_dim = 576 (the real model's 512 + 64).
TINY_DEEPSEEK_V3 = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=64,
                        kv_lora_rank=512, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
                        n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                        first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5,
                        norm_topk_prob=True, max_position_embeddings=1024, tie_word_embeddings=False,
                        num_nextn_predict_layers=0, topk_method="noaux_tc", scoring_func="sigmoid")
# DeepSeek-V2-Lite's shape: no q-LoRA, softmax routing without renormalisation, YaRN with mscale 0.707
TINY_DEEPSEEK_V2 = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None,
                        kv_lora_rank=512, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
                        n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                        first_k_dense_replace=1, n_shared_experts=2, routed_scaling_factor=1.5,
                        norm_topk_prob=False, max_position_embeddings=1024, tie_word_embeddings=False,
                        topk_method="greedy", scoring_func="softmax",
                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                         "original_max_position_embeddings": 256, "beta_fast": 32.0,
                                         "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707})
# gpt-oss: attention sinks, a sliding window (8) shorter than the probes alternating with full attention
TINY_GPT_OSS = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_local_experts=8,
                    num_experts_per_tok=2, max_position_embeddings=1024, tie_word_embeddings=False,
                    sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                                     "original_max_position_embeddings": 256, "beta_fast": 32.0,
                                     "beta_slow": 1.0, "truncate": False})
# GLM-4.5's shape: q/k/v biases, q/k norms, rotary on half of each head's dims, sigmoid routing with the
# score-correction bias, a shared expert, a dense first layer (head_dim 64: vLLM-CPU's minimum)
TINY_GLM4_MOE = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                     partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True, n_routed_experts=8,
                     num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1,
                     routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=1024,
                     tie_word_embeddings=False, num_nextn_predict_layers=0)
PRESETS = {"qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", TINY_QWEN3),
           "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", TINY_GLM4_MOE),
           "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", TINY_DEEPSEEK_V3),
           "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", TINY_DEEPSEEK_V2),
           "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", TINY_GPT_OSS)}


def write_tokenizer(out: Path, vocab_size: int = VOCAB) -> None:
    """A byte-level BPE tokenizer.json trained locally (no hub), vocab <= ``vocab_size``."""
    from r1mega.data.tokenizer_training import demo_corpus, train_hf_bpe

    train_hf_bpe(demo_corpus(300), out / "tokenizer.json", vocab_size=vocab_size)


def tiny_hf_dir(out: Path, seed: int, preset: str = "qwen3_moe", bias_seed: int | None = None,
                **overrides) -> Path:
    """Random tiny model of ``preset``. Router score-correction biases (DeepSeek-V3) are drawn from
    ``bias_seed`` (default ``seed``): same seed, other ``bias_seed`` = the same model but for them."""
    import transformers

    config_cls, model_cls, base = PRESETS[preset]
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**{**base, **overrides}, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = getattr(transformers, model_cls)(cfg).float()
    biases = torch.Generator().manual_seed(seed if bias_seed is None else bias_seed)
    with torch.no_grad():  # larger weights than the default init: logits far from uniform
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
        for name, buf in model.named_buffers():  # zeros by default: make them change the routing
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=biases) * 0.2)
    model.save_pretrained(out, safe_serialization=True)
    if not (out / "tokenizer.json").exists():
        write_tokenizer(out)
    return out


def checkpoint_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def as_buckets(tensors: dict[str, torch.Tensor], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Bridge-like buckets: layer order, cut by bytes (layers may straddle buckets)."""
    import re

    def key(name):
        m = re.match(r"model\.layers\.(\d+)\.", name)
        return (1, int(m[1]), name) if m else ((0 if "embed" in name else 2), 0, name)

    out, cur, size = [], [], 0
    for name in sorted(tensors, key=key):
        t = tensors[name]
        if cur and size + t.nbytes > bucket_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append((name, t))
        size += t.nbytes
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def hf_logprobs(hf_dir: Path, seqs: list[list[int]]) -> torch.Tensor:
    """[B, S-1] log p(t_k | t_<k) from transformers (float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = torch.tensor(seqs)
    logits = model(ids).logits.float()
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    return lp.gather(-1, ids[:, 1:, None])[..., 0]


def hf_config(hf_dir: Path) -> dict:
    return json.loads((Path(hf_dir) / "config.json").read_text())


def learner_with_hf_start(spec: dict, micro_batch_size: int, timeout_minutes: int):
    """Rank-program set-up shared by the multi-rank engine workers: the process group and megatron state
    for ``spec["layout"]``, a tiny ``spec["preset"]`` model (default qwen3_moe; ``spec["overrides"]``) built
    for training, a tokenizer (rank 0) and the initial weights saved as an HF directory ``<root>/w0``
    (collective). ``spec["expert_bias_std"]``: draw the routers' expert biases (zeros at init) first.
    Returns ``(tm, model_cfg, parallel, rank, root)``."""
    import torch.distributed as dist

    from r1mega.platform.distributed import init_model_parallel, init_process_group
    from r1mega.train.parallel_check import Layout

    init_process_group(timeout_minutes=timeout_minutes)
    parallel = Layout.parse(spec["layout"]).parallel_config(micro_batch_size=micro_batch_size)
    init_model_parallel(parallel, seed=1)

    from r1mega.bridge.hf_dir import save_hf
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig, OptimizerConfig
    from r1mega.train.model_setup import build_training_model

    model_cfg = resolve_model(ModelConfig(preset=spec.get("preset", "qwen3_moe"), **spec["overrides"]))
    tm = build_training_model(model_cfg, parallel, OptimizerConfig(), total_steps=1)
    if spec.get("expert_bias_std"):
        draw_expert_biases(tm.module, spec["expert_bias_std"], seed=0)
    rank = dist.get_rank()
    root = Path(spec["root"])
    if rank == 0:
        (root / "tok").mkdir(parents=True, exist_ok=True)
        write_tokenizer(root / "tok", model_cfg.vocab_size)
    dist.barrier()
    save_hf(tm.module, tm.config, model_cfg, root / "w0", tokenizer_dir=root / "tok")
    return tm, model_cfg, parallel, rank, root


@torch.no_grad()
def draw_expert_biases(module: torch.nn.Module, std: float, seed: int) -> int:
    """Fill every ``router.expert_bias`` buffer (aux-loss-free balancing; zeros at init) from a per-layer
    generator (the same on every rank). Returns how many were drawn."""
    import zlib

    n = 0
    for name, buf in module.named_buffers():
        if name.endswith("router.expert_bias"):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            buf.copy_(torch.randn(buf.shape, generator=gen) * std)
            n += 1
    return n


def engine_refit_report(root: Path, preset: str, timeout_s: int = 540) -> dict:
    """``rollout_engine_check.py`` on the tiny ``preset`` (parity checks only, no sampling): its report."""
    import sys

    from r1mega.platform.spawn import spawn_ranks

    report = root / "report.json"
    spec = {"root": str(root), "report": str(report), "bucket_bytes": 400_000, "preset": preset, "sampling": False}
    spawn_ranks([str(Path(__file__).with_name("rollout_engine_check.py")), json.dumps(spec)], 1,
                timeout_s=timeout_s, name=f"engine-{preset}")
    r = json.loads(report.read_text())
    print(json.dumps(r, indent=1), file=sys.stderr)
    return r


def assert_refit_parity(r: dict, tol: float = 1e-5) -> None:
    """The engine matched transformers fresh, after a push of other weights (prefill and decode) and over
    A->B->A, and each weight set really differed from the other."""
    assert r["fresh_vs_a"]["max_abs"] < tol, r["fresh_vs_a"]
    assert r["fresh_vs_b"]["max_abs"] > 0.1
    assert r["after_push_vs_b"]["max_abs"] < tol, r["after_push_vs_b"]
    assert r["after_push_vs_a"]["max_abs"] > 0.1
    assert r["decode_after_push_vs_b"]["max_abs"] < tol, r["decode_after_push_vs_b"]
    assert max(r["cycle_max_abs"]) < tol, r["cycle_max_abs"]
