"""Mini-batch updates (``rl.mini_batches``, ``rl.epochs``): k optimizer steps per rollout batch against
old log-probs computed once, before the first update."""

from __future__ import annotations

import pytest
import torch

from r1mega.config.schema import ModelConfig, OptimizerConfig, ParallelConfig, RLConfig


@pytest.fixture
def two_policies(single_process_megatron):
    """Two identical training models (layout-invariant init from the same seed)."""
    from r1mega.config.presets import resolve_model
    from r1mega.train.model_setup import build_training_model

    model = resolve_model(ModelConfig(preset="qwen3_moe"))
    build = lambda: build_training_model(model, ParallelConfig(), OptimizerConfig(lr=1e-3), total_steps=8)  # noqa: E731
    return build(), build(), model


def _batch(model, rows: int = 8, width: int = 17):
    from r1mega.rl.learner import LearnerBatch

    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, model.vocab_size, (rows, width), generator=gen)
    mask = torch.zeros(rows, width - 1)
    lengths = torch.zeros(rows, dtype=torch.long)
    for r in range(rows):
        prompt = int(torch.randint(2, 6, (1,), generator=gen))
        length = int(torch.randint(1, width - prompt + 1, (1,), generator=gen))
        mask[r, prompt - 1: prompt - 1 + length] = 1.0
        lengths[r] = prompt + length
    batch = LearnerBatch(tokens, mask, advantages=torch.randn(rows, generator=gen), lengths=lengths)
    batch.ref_logp = -3.0 + 0.1 * torch.randn(rows, width - 1, generator=gen)  # exercises the KL term
    return batch


def _params(tm) -> list[torch.Tensor]:
    return [p.detach().clone() for p in tm.module.parameters()]


@pytest.mark.timeout(300)
def test_two_mini_batches_equal_two_steps_on_the_halves_with_the_first_old_logprobs(two_policies):
    from r1mega.rl.learner import LearnerSettings, compute_logprobs, learner_step
    from r1mega.rl.updates import learner_update

    tm_a, tm_b, model = two_policies
    rl = RLConfig(mini_batches=2, kl_coef=0.01, tis_cap=None)
    settings = LearnerSettings(micro_batch_size=2, valid_vocab=model.vocab_size, temperature=0.9)
    assert all(torch.equal(a, b) for a, b in zip(_params(tm_a), _params(tm_b)))

    updates = learner_update(tm_a, _batch(model), settings, rl)

    manual = _batch(model)
    manual.old_logp = compute_logprobs(tm_b.ddp, tm_b.module, manual, settings)  # before any update
    steps = [learner_step(tm_b, manual.rows(slice(0, 4)), settings, rl),
             learner_step(tm_b, manual.rows(slice(4, 8)), settings, rl)]

    assert [(u.update, u.epoch, u.mini_batch) for u in updates] == [(0, 0, 0), (1, 0, 1)]
    for got, want in zip(updates, steps):
        assert got.values == pytest.approx(want.values, rel=1e-6, abs=1e-9)
        assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-6)
    for a, b in zip(_params(tm_a), _params(tm_b)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    # the first mini-batch is on-policy (ratio exactly 1); the second is scored after one update
    first, second = updates[0].values, updates[1].values
    assert first["approx_kl"] == 0.0 and first["clip_frac"] == 0.0
    assert second["approx_kl"] != 0.0


@pytest.mark.timeout(300)
def test_epochs_pass_over_the_batch_again_against_the_same_old_logprobs(two_policies):
    from r1mega.rl.learner import LearnerSettings, compute_logprobs
    from r1mega.rl.updates import learner_update

    tm, _, model = two_policies
    settings = LearnerSettings(micro_batch_size=4, valid_vocab=model.vocab_size)
    batch = _batch(model)
    before = compute_logprobs(tm.ddp, tm.module, batch, settings)
    updates = learner_update(tm, batch, settings, RLConfig(mini_batches=2, epochs=2, tis_cap=None))
    assert [(u.update, u.epoch, u.mini_batch) for u in updates] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    assert torch.equal(batch.old_logp, before)  # computed once, before the first update
    assert updates[0].values["approx_kl"] == 0.0
    assert all(u.values["approx_kl"] != 0.0 for u in updates[1:])  # every later update is off-policy
    assert not any(u.skipped for u in updates)


def test_mini_batch_count_must_divide_the_batch():
    from r1mega.rl.updates import mini_batch_slices

    assert mini_batch_slices(8, 2) == [slice(0, 4), slice(4, 8)]
    with pytest.raises(ValueError, match=r"choose rl.mini_batches from \[1, 2, 3, 6\]"):
        mini_batch_slices(6, 4)


@pytest.mark.parametrize("overrides,phrase", [
    (["rl.mini_batches=0"], "rl.mini_batches=0 must be >= 1"),
    (["rl.epochs=0"], "rl.epochs=0 must be >= 1"),
    (["rl.mini_batches=3", "trainer.global_batch_size=8"],
     "trainer.global_batch_size=8 is not divisible by rl.mini_batches*dp*micro_batch_size = 3*1*1 = 3"),
    (["rl.mini_batches=2", "trainer.global_batch_size=6", "parallel.dp=2", "parallel.max_tokens_per_micro_batch=64"],
     "trainer.global_batch_size=6 is not divisible by rl.mini_batches*dp = 2*2 = 4"),
])
def test_bad_update_config_is_refused(overrides, phrase):
    from r1mega.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=phrase.replace("*", r"\*")):
        load_config(None, overrides, world_size=2 if "parallel.dp=2" in overrides else 1)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mini_batch_updates_match_single_process_under_dp2_packed_by_tokens():
    """Two updates per rollout batch (two rollout batches): DP2 with token-budget packing equals one process."""
    from r1mega.train.parallel_check import CheckSpec, Layout, compare, run_layout

    spec = CheckSpec(model=ModelConfig(preset="qwen3_moe", moe_aux_loss_coeff=0.0), objective="grpo", pack=True,
                     global_batch=8, max_tokens_per_micro_batch=48,
                     rl=RLConfig(mini_batches=2, kl_coef=0.01, entropy_coef=0.01, tis_cap=2.0))
    ref = run_layout(spec, Layout(), 240)
    got = run_layout(spec, Layout.parse("dp2"), 240)
    loss_err, grad_err, param_err = compare(ref, got)
    assert loss_err < 1e-5 and grad_err < 1e-4 and param_err < 2e-3, (loss_err, grad_err, param_err)
    assert ref["metrics"][0]["approx_kl"] != 0.0  # the reported (second) update is off-policy
