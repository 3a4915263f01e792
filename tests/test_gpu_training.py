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


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_grpo_learner_step_on_gpu(single_process_megatron, pack):
    """The RL learner on CUDA: batches planned on the host reach the model's device, log-probs equal the
    model's own logits, the first update is on-policy, the loss does not depend on the micro-batch count,
    and the update lowers the clipped-surrogate loss."""
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig, OptimizerConfig, ParallelConfig, RLConfig
    from r1mega.rl.learner import LearnerBatch, LearnerSettings, compute_logprobs, learner_step
    from r1mega.train.model_setup import build_training_model

    model = resolve_model(ModelConfig(preset="qwen3_moe", moe_aux_loss_coeff=0.0))
    tm = build_training_model(model, ParallelConfig(micro_batch_size=2), OptimizerConfig(lr=1e-3), total_steps=4)
    assert next(tm.module.parameters()).is_cuda
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (4, 17), generator=gen)
    lengths = torch.tensor([17, 12, 9, 15])
    mask = (torch.arange(16)[None, :] < (lengths - 1)[:, None]).float()
    mask[:, :4] = 0  # the prompt
    batch = LearnerBatch(tokens, mask, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]), lengths=lengths)
    settings = LearnerSettings(micro_batch_size=2, valid_vocab=model.vocab_size, pack=pack)

    batch.old_logp = compute_logprobs(tm.ddp, tm.module, batch, settings)
    with torch.no_grad():
        cuda_tokens = tokens.cuda()
        positions = torch.arange(17, device="cuda")[None].expand(4, 17)
        logits = tm.module(cuda_tokens, positions, None).float()
    direct = torch.log_softmax(logits[:, :-1, :model.vocab_size], -1).gather(-1, cuda_tokens[:, 1:, None]).squeeze(-1)
    real = mask.bool()
    torch.testing.assert_close(batch.old_logp[real], direct.cpu()[real], atol=1e-4, rtol=1e-4)

    rl = RLConfig(kl_coef=0.0, tis_cap=None)
    one = learner_step(tm, batch, LearnerSettings(micro_batch_size=4, valid_vocab=model.vocab_size, pack=pack), rl,
                       forward_only=True)
    first = learner_step(tm, batch, settings, rl)
    assert not first.skipped and math.isfinite(first.grad_norm) and first.grad_norm > 0
    assert first.values["approx_kl"] == pytest.approx(0.0, abs=1e-6) and first.values["clip_frac"] == 0.0
    assert first.values["loss"] == pytest.approx(one.values["loss"], rel=1e-5, abs=1e-6)
    after = learner_step(tm, batch, settings, rl, forward_only=True)
    assert after.values["loss"] < first.values["loss"]
