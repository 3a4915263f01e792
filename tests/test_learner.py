"""The learner step: parity with one process under 3D layouts, and invariance of loss and gradients to
how the same global batch is split into micro-batches and data-parallel ranks (every aggregation mode).
"""

from __future__ import annotations

import math

import pytest

from r1mega.config.schema import ModelConfig, RLConfig
from r1mega.rl.aggregation import LOSS_AGG_MODES
from r1mega.train.parallel_check import CheckSpec, Layout, check_layouts, compare, run_layout

TIMEOUT_S = 240
TOL = 1e-3


@pytest.mark.timeout(600)
def test_grpo_step_matches_single_process_under_tp2ep2_and_pp2():
    """Old-policy log-probs recomputed with ``compute_logprobs`` and a frozen ``ReferencePolicy`` for the
    KL term are part of every step (see parallel_check.learner_batch/_train_step)."""
    spec = CheckSpec(model=ModelConfig(preset="qwen3_moe"), objective="grpo")
    reference = run_layout(spec, Layout(), TIMEOUT_S)
    reports = check_layouts(spec, [Layout.parse("tp2ep2"), Layout.parse("pp2")], TIMEOUT_S, reference=reference)
    for r in reports[1:]:
        assert r.max_rel_err < TOL, r
    assert reports[0].losses[0] != reports[0].losses[1]
    first, second = reference["metrics"]
    # recomputed old log-probs equal the training forward's: on-policy ratio 1, nothing clipped
    assert first["approx_kl"] == 0.0 and first["clip_frac"] == 0.0
    # the reference is the initial policy: KL 0 before the first update, positive after it
    assert first["kl"] == 0.0 and second["kl"] > 0.0
    assert first["tokens"] > 0 and 0.0 < first["entropy"] < 7.0


@pytest.mark.timeout(300)
def test_sft_step_matches_single_process_for_mla_under_tp2():
    spec = CheckSpec(model=ModelConfig(preset="deepseek_v3"), objective="sft")
    reports = check_layouts(spec, [Layout.parse("tp2")], TIMEOUT_S)
    assert reports[1].max_rel_err < TOL, reports[1]


# CI runs token-mean; the sequence-mean modes (Dr. GRPO's fixed-length norm among them) are `slow`: they share
# its code path, only the per-token weights differ, and those are tested in test_rl_aggregation
FAST_AGG_MODES = ("token-mean",)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", [m if m in FAST_AGG_MODES else pytest.param(m, marks=pytest.mark.slow)
                                  for m in LOSS_AGG_MODES])
def test_loss_and_grads_do_not_depend_on_microbatches_or_dp(mode):
    # aux-loss-free: megatron's MoE aux loss is a per-micro-batch statistic by design
    model = ModelConfig(preset="qwen3_moe", moe_aux_loss_coeff=0.0)
    rl = RLConfig(loss_agg_mode=mode, kl_coef=0.01, entropy_coef=0.01, tis_cap=None)

    def spec(mbs):
        return CheckSpec(model=model, objective="grpo", rl=rl, micro_batch_size=mbs, global_batch=4, steps=1)

    one_micro = run_layout(spec(4), Layout(), TIMEOUT_S)
    four_micro = run_layout(spec(1), Layout(), TIMEOUT_S)
    dp2 = run_layout(spec(1), Layout.parse("dp2"), TIMEOUT_S)
    for name, got in [("4 micro-batches", four_micro), ("dp2", dp2)]:
        loss_err, grad_err, param_err = compare(one_micro, got)
        assert max(loss_err, grad_err) < 1e-5, f"{mode} {name}: loss {loss_err:.2e} grad {grad_err:.2e}"
        assert param_err < TOL, f"{mode} {name}: param {param_err:.2e}"


def test_rl_names_accepted_by_config_equal_the_registries():
    from r1mega.config import validate
    from r1mega.rl import ADVANTAGES, KL_ESTIMATORS, LOSS_AGG_MODES, POLICY_LOSSES, REFILL_POLICIES
    from r1mega.rl.routing import ROUTING_REPLAY_MODES

    assert set(validate.ADVANTAGE_ESTIMATORS) == set(ADVANTAGES.names())
    assert set(validate.POLICY_LOSS_NAMES) == set(POLICY_LOSSES.names())
    assert set(validate.KL_ESTIMATOR_NAMES) == set(KL_ESTIMATORS)
    assert set(validate.LOSS_AGG_MODE_NAMES) == set(LOSS_AGG_MODES)
    assert set(validate.REFILL_POLICY_NAMES) == set(REFILL_POLICIES)
    assert set(validate.ROUTING_REPLAY_NAMES) == set(ROUTING_REPLAY_MODES)


@pytest.mark.parametrize("override,phrase", [
    ("rl.policy_loss=ppo2", "rl.policy_loss='ppo2' is not supported"),
    ("rl.loss_agg_mode=mean", "rl.loss_agg_mode='mean' is not supported"),
    ("rl.tis_cap=0", "rl.tis_cap=0.0 must be > 0"),
])
def test_bad_rl_config_is_refused(override, phrase):
    from r1mega.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


@pytest.mark.timeout(300)
def test_gspo_with_tis_and_dual_clip_matches_single_process_under_tp2():
    rl = RLConfig(policy_loss="gspo", loss_agg_mode="seq-mean-token-mean", kl_coef=0.01, entropy_coef=0.01,
                  tis_cap=2.0, dual_clip_c=3.0)
    spec = CheckSpec(model=ModelConfig(preset="qwen3_moe"), objective="grpo", rl=rl)
    reference = run_layout(spec, Layout(), TIMEOUT_S)
    reports = check_layouts(spec, [Layout.parse("tp2")], TIMEOUT_S, reference=reference)
    assert reports[1].max_rel_err < TOL, reports[1]
    # the synthetic engine log-probs differ from the trainer's by N(0, 0.3): the mismatch metrics see it
    metrics = reference["metrics"][0]
    assert 0.1 < metrics["mismatch_abs_mean"] < 0.5 and metrics["mismatch_kl"] > 0


@pytest.fixture
def tiny_policy(single_process_megatron):
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import OptimizerConfig, ParallelConfig
    from r1mega.train.model_setup import build_training_model

    model = resolve_model(ModelConfig(preset="qwen3_moe"))
    return build_training_model(model, ParallelConfig(), OptimizerConfig(lr=1e-3), total_steps=4), model


@pytest.mark.timeout(120)
def test_nonfinite_loss_skips_the_update(tiny_policy):
    import torch

    from r1mega.rl.learner import LearnerBatch, LearnerSettings, learner_step

    tm, model = tiny_policy
    tokens = torch.randint(0, model.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8)
    settings = LearnerSettings(micro_batch_size=2, valid_vocab=model.vocab_size)
    before = [p.detach().clone() for p in tm.module.parameters()]
    bad = learner_step(tm, LearnerBatch(tokens, mask, advantages=torch.tensor([float("nan"), 1.0])), settings,
                       RLConfig(tis_cap=None))
    assert bad.skipped and not math.isfinite(bad.values["loss"])
    assert all(torch.equal(a, b) for a, b in zip(before, tm.module.parameters()))
    good = learner_step(tm, LearnerBatch(tokens, mask, advantages=torch.tensor([-1.0, 1.0])), settings,
                        RLConfig(tis_cap=None))
    assert not good.skipped and math.isfinite(good.grad_norm) and good.grad_norm > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, tm.module.parameters()))


@pytest.mark.timeout(120)
def test_nonfinite_gradient_with_finite_loss_skips_the_update(tiny_policy):
    """megatron checks gradients only with a loss scaler (fp16): in fp32 an Inf gradient would reach Adam."""
    import torch

    from r1mega.rl.learner import LearnerBatch, LearnerSettings, learner_step

    tm, model = tiny_policy
    tokens = torch.randint(0, model.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = LearnerBatch(tokens, torch.ones(2, 8))
    settings = LearnerSettings(micro_batch_size=2, valid_vocab=model.vocab_size)
    before = [p.detach().clone() for p in tm.module.parameters()]
    lr_steps = tm.scheduler.num_steps
    hook = next(tm.module.parameters()).register_hook(lambda g: g * float("inf"))
    bad = learner_step(tm, batch, settings, None)
    hook.remove()
    assert bad.skipped and math.isfinite(bad.values["loss"])
    assert all(torch.equal(a, b) for a, b in zip(before, tm.module.parameters()))
    assert tm.scheduler.num_steps == lr_steps
    good = learner_step(tm, batch, settings, None)
    assert not good.skipped and math.isfinite(good.grad_norm)
    assert all(torch.isfinite(p).all() for p in tm.module.parameters())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("at", [0, 17, -1])
def test_all_finite_finds_one_bad_value_anywhere(bad, at):
    import torch

    from r1mega.rl.learner import all_finite

    x = (torch.rand(1000) * 2 - 1) * 3e38  # huge but finite
    x[5] = 3.4e38
    assert all_finite(x) and all_finite(torch.empty(0))
    x[at] = bad
    assert not all_finite(x)
