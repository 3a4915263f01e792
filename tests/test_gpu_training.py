"""The local (TE-free) layer spec trains on a GPU: megatron DDP + distributed optimizer in bf16."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("grouped", [False, True])
def test_local_spec_moe_trains_in_bf16_on_gpu(single_process_megatron, grouped):
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig, OptimizerConfig, ParallelConfig
    from r1mega.models.grouped_experts import expert_path
    from r1mega.train.lm_step import lm_train_step
    from r1mega.train.model_setup import build_training_model

    model = resolve_model(ModelConfig(preset="qwen3_moe", precision="bf16", moe_grouped_experts=grouped))
    tm = build_training_model(model, ParallelConfig(micro_batch_size=2), OptimizerConfig(lr=3e-3), total_steps=8)
    assert next(tm.module.parameters()).is_cuda
    assert ("grouped" in expert_path(tm.module)) == grouped
    tokens = torch.randint(0, model.vocab_size, (4, 65), generator=torch.Generator().manual_seed(0))
    losses = [lm_train_step(tm, tokens, 2).loss for _ in range(8)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5, losses  # memorising one batch


def test_token_logprobs_use_the_cuda_op(single_process_megatron):
    from r1mega.kernels import load_ops
    from r1mega.rl.vocab_parallel import VocabShard, logprob_and_entropy

    assert load_ops()["cuda"], load_ops()
    hidden = torch.randn(64, 32, device="cuda")
    weight = torch.randn(1000, 32, device="cuda")
    target = torch.randint(0, 1000, (64,), device="cuda")
    lp, ent = logprob_and_entropy(hidden, weight, target, VocabShard(0, 1000), impl="ext")
    ref = torch.log_softmax(hidden @ weight.t(), -1)
    torch.testing.assert_close(lp, ref.gather(1, target[:, None]).squeeze(1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1), atol=1e-4, rtol=1e-4)
