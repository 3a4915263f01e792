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


def test_local_spec_uses_r1mega_norm_and_attention(single_process_megatron):
    from r1mega.models.layer_spec import build_block_spec
    from r1mega.models.local_layers import SDPAttention, SequenceParallelNorm

    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_moe_experts=4,
                            normalization="RMSNorm", moe_layer_freq=[0, 1])
    specs = build_block_spec(cfg, use_te=False)
    for layer in specs.layer_specs:
        sub = layer.submodules
        assert sub.input_layernorm is SequenceParallelNorm
        assert sub.self_attention.submodules.core_attention is SDPAttention


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
