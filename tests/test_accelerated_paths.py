"""Which implementation runs where: TE/FP8 on GPUs that have it, local torch layers elsewhere."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


@pytest.mark.timeout(120)
@pytest.mark.parametrize("module", ["r1mega.train.lm_step", "r1mega.models.sharding", "r1mega.ckpt"])
def test_any_module_can_be_imported_first(module):
    """megatron must never be imported before the CPU emulation, whatever is imported first."""
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr


def test_fp8_without_transformer_engine_is_a_clear_error():
    from r1mega.models.layer_spec import use_transformer_engine
    from r1mega.platform.optional import have_transformer_engine

    if have_transformer_engine():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(RuntimeError, match="precision=fp8 needs Transformer Engine"):
        use_transformer_engine("fp8")
    assert use_transformer_engine("bf16") is False


@pytest.mark.parametrize("recipe,te,cc,expect", [
    ("delayed", None, (9, 0), "needs Transformer Engine on an FP8-capable GPU"),
    ("delayed", (2, 4), None, "needs a CUDA GPU"),
    ("delayed", (2, 4), (8, 0), "compute capability >= 8.9; this GPU is 8.0"),
    ("blockwise", (2, 4), (8, 9), "compute capability >= 9.0; this GPU is 8.9"),
    ("blockwise", (2, 1), (9, 0), "needs Transformer Engine >= 2.3; installed 2.1"),
    ("mxfp8", (2, 4), (9, 0), "compute capability >= 10.0"),
    ("fancy", (2, 4), (9, 0), "model.fp8_recipe='fancy' is not one of"),
    ("delayed", (1, 12), (8, 9), None),
    ("blockwise", (2, 3), (9, 0), None),
    ("mxfp8", (2, 4), (10, 0), None),
])
def test_fp8_support_names_what_is_missing(recipe, te, cc, expect):
    from r1mega.platform.optional import fp8_support_problem

    problem = fp8_support_problem(recipe, te, cc)
    assert (problem is None) if expect is None else (expect in problem), problem


def test_fp8_recipe_names_match_between_config_and_platform():
    from r1mega.config.validate import FP8_RECIPES
    from r1mega.platform.optional import FP8_RECIPES as SUPPORT

    assert set(FP8_RECIPES) == set(SUPPORT)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["delayed", "blockwise"])
def test_fp8_training_step_on_gpu(single_process_megatron, recipe):
    """TE FP8 layers train (loss falls) with the recipe; needs TE and an FP8 GPU, else skips."""
    pytest.importorskip("transformer_engine")
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig, OptimizerConfig, ParallelConfig
    from r1mega.platform.optional import fp8_support_problem, transformer_engine_version
    from r1mega.train.lm_step import lm_train_step
    from r1mega.train.model_setup import build_training_model

    problem = fp8_support_problem(recipe, transformer_engine_version(), torch.cuda.get_device_capability())
    if problem:
        pytest.skip(problem)
    model = resolve_model(ModelConfig(preset="qwen3_moe", precision="fp8", fp8_recipe=recipe, hidden_size=128,
                                      moe_ffn_hidden_size=128, ffn_hidden_size=256))
    tm = build_training_model(model, ParallelConfig(micro_batch_size=2), OptimizerConfig(lr=3e-3), total_steps=6)
    assert tm.config.fp8 == "hybrid" and tm.config.fp8_recipe == recipe
    tokens = torch.randint(0, model.vocab_size, (4, 129), generator=torch.Generator().manual_seed(0))
    losses = [lm_train_step(tm, tokens, 2).loss for _ in range(6)]
    assert losses[-1] < losses[0], losses


def test_local_spec_uses_r1mega_norm_and_attention(single_process_megatron):
    from r1mega.models.layer_spec import build_block_spec
    from r1mega.models.local_layers import RopedCacheSelfAttention, SDPAttention, SequenceParallelNorm

    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_moe_experts=4,
                            normalization="RMSNorm", moe_layer_freq=[0, 1])
    specs = build_block_spec(cfg, use_te=False)
    for layer in specs.layer_specs:
        sub = layer.submodules
        assert sub.input_layernorm is SequenceParallelNorm
        assert sub.self_attention.submodules.core_attention is SDPAttention
        assert sub.self_attention.module is RopedCacheSelfAttention


@pytest.mark.gpu
def test_transformer_engine_spec_builds_and_trains_on_gpu():
    pytest.importorskip("transformer_engine")
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig, ParallelConfig
    from r1mega.models.policy import build_policy
    from r1mega.platform.distributed import init_model_parallel, init_process_group

    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    init_process_group()
    init_model_parallel(ParallelConfig(), seed=1)
    stage = build_policy(resolve_model(ModelConfig(preset="qwen3_moe", precision="bf16")), ParallelConfig())
    assert stage.use_te
    assert any(isinstance(m, TEDotProductAttention) for m in stage.model.modules())
    model = stage.model.cuda()
    tokens = torch.randint(0, 500, (2, 32), device="cuda")
    pos = torch.arange(32, device="cuda").expand(2, 32)
    model(tokens, pos, None, labels=tokens).float().mean().backward()
