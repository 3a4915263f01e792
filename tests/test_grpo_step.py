"""The GRPO step's options, through ``grpo_step`` itself on a real (tiny, one-process) megatron policy.

The samples come from a fixed schedule (what an engine would have returned), so each option's effect can be
compared with a learner step built by hand: ``rl.kl_in_reward`` subtracts ``kl_coef`` x KL from each sample's
reward before the advantages; ``seq-mean-token-sum-norm`` normalises by ``rl.dr_grpo_norm_length`` (default
``rollout.max_new_tokens``). DAPO dynamic sampling is tested on scripted rewards.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from r1mega.config import load_config
from r1mega.rollout import Generation

N, PROMPTS = 4, 2  # samples per prompt, prompts per step


def _cfg(*overrides: str):
    return load_config("configs/demo_cpu.yaml", ["trainer.global_batch_size=8", f"rollout.n={N}",
                                                 "parallel.micro_batch_size=4", "rollout.max_new_tokens=12",
                                                 "checkpoint.save_interval=0", *overrides], world_size=1)


def _gens(vocab: int) -> list[Generation]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(PROMPTS * N):
        prompt = torch.randint(4, vocab, (5,), generator=g).tolist()
        resp = torch.randint(4, vocab, (3 + i % 4,), generator=g).tolist()
        out.append(Generation(i // N, i % N, prompt, resp, "", [-1.0] * len(resp)))
    return out


REWARDS = [1.0, 0.0, 0.5, 0.0, 0.2, 0.9, 0.9, 0.1]


class FixedSamples:
    """A schedule whose rollout is fixed: the samples and rewards an engine and the rewards returned."""

    colocated = False

    def __init__(self, gens):
        self.gens = gens

    def rollout(self, run, step):
        from r1mega.train.grpo import Rollout

        return Rollout(list(self.gens), list(REWARDS), [i // N for i in range(len(self.gens))], {})

    def after_update(self, run, step):
        return {}


def _step(cfg, tmp_path, reference: bool):
    """One ``grpo_step`` from the seeded init; returns its record."""
    from r1mega.rl.learner import ReferencePolicy
    from r1mega.train.grpo import GRPORun, grpo_step, learner_settings
    from r1mega.train.metrics import MetricsLogger
    from r1mega.train.model_setup import build_training_model
    from r1mega.train.resilience import Checkpointer

    tm = build_training_model(cfg.model, cfg.parallel, cfg.optimizer, total_steps=4)
    ref = None
    if reference:  # a reference that differs from the policy, so the KL is not 0
        ref = ReferencePolicy(tm)
        with torch.no_grad():
            for p in ref.module.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    tr = SimpleNamespace(cfg=cfg, tm=tm, tokenizer=SimpleNamespace(pad_id=0), eval_set=None,
                         metrics=MetricsLogger(tmp_path, cfg.logging, progress=False),
                         ckpt=Checkpointer(cfg, tm, tmp_path / "metrics.jsonl"))
    run = GRPORun(cfg, [], [], PROMPTS, learner_settings(cfg), FixedSamples(_gens(cfg.model.vocab_size)),
                  reference=ref)
    return grpo_step(tr, run, 1), tm, ref


def _by_hand(cfg, advantages_from, constant_norm: float):
    """The learner step on the same batch with advantages computed here; returns its metrics."""
    from r1mega.rl.advantages import compute_advantages
    from r1mega.rl.learner import learner_step
    from r1mega.train.grpo import build_batch, learner_settings
    from r1mega.train.model_setup import build_training_model

    tm = build_training_model(cfg.model, cfg.parallel, cfg.optimizer, total_steps=4)
    batch = build_batch(_gens(cfg.model.vocab_size), 0)
    rewards = advantages_from(tm, batch)
    batch.advantages = compute_advantages("grpo", rewards, torch.arange(PROMPTS * N) // N,
                                          norm_by_std=cfg.rl.norm_by_std, eps=cfg.rl.advantage_eps)
    settings = replace(learner_settings(cfg), constant_norm=constant_norm)
    return learner_step(tm, batch, settings, replace(cfg.rl, kl_coef=0.0))


# The demo's GRPO step at world 1, learner side (the samples are fixed here; the engine's round trips are
# budgeted with a real engine in tests/test_resume.py): megatron's gradient reduce-scatter, grad-norm
# all-reduce and parameter all-gather, nothing else. A collective or host round trip added to every step
# fails here, not in a timing.
LEARNER_COLLECTIVES = 3


@pytest.mark.timeout(300)
def test_demo_step_stays_within_its_collective_budget(single_process_megatron, tmp_path):
    record, _, _ = _step(_cfg(), tmp_path, reference=False)
    assert record["calls/collectives"] == LEARNER_COLLECTIVES, record
    assert record["calls/engine_round_trips"] == 0, record


def test_kl_penalty_in_the_reward_is_the_summed_estimate():
    from r1mega.train.grpo import kl_reward_penalty

    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -0.7, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    # k1 = logp - ref over the response tokens: (0.5 - 1.0), (0.5 + 8.7)
    assert kl_reward_penalty(logp, ref, mask, "k1").tolist() == pytest.approx([-0.5, 9.2])
    # k2 = (logp - ref)^2 / 2: (0.125 + 0.5), (0.125 + 37.845)
    assert kl_reward_penalty(logp, ref, mask, "k2").tolist() == pytest.approx([0.625, 37.97])


@pytest.mark.timeout(300)
def test_kl_in_reward_shapes_the_advantages_not_the_loss(single_process_megatron, tmp_path):
    from r1mega.rl.learner import ReferencePolicy, compute_logprobs
    from r1mega.train.grpo import kl_reward_penalty, learner_settings

    coef = 0.3
    cfg = _cfg(f"rl.kl_coef={coef}", "rl.kl_in_reward=true", "rl.kl_estimator=k1")
    record, _, _ = _step(cfg, tmp_path, reference=True)

    def shaped(tm, batch):  # the same reference (perturbed copy of the same init), by hand
        ref = ReferencePolicy(tm)
        with torch.no_grad():
            for p in ref.module.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        settings = learner_settings(cfg)
        kl = kl_reward_penalty(compute_logprobs(tm.ddp, tm.module, batch, settings), ref.logprobs(batch, settings),
                               batch.loss_mask, "k1")
        assert kl.abs().max() > 1e-3, "the reference equals the policy: a weak test"
        return torch.tensor(REWARDS) - coef * kl

    hand = _by_hand(cfg, shaped, float(cfg.rollout.max_new_tokens))
    assert record["loss"] == pytest.approx(hand.values["loss"], rel=1e-5, abs=1e-7)
    assert record["grad_norm"] == pytest.approx(hand.grad_norm, rel=1e-5)
    assert record["kl_in_reward/mean"] > 1e-3
    # without the shaping (the plain rewards) the step would differ: the test can tell
    plain = _by_hand(cfg, lambda tm, batch: torch.tensor(REWARDS), float(cfg.rollout.max_new_tokens))
    assert abs(plain.grad_norm - record["grad_norm"]) > 1e-4 * record["grad_norm"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("norm_length", [None, 7])
def test_dr_grpo_norm_defaults_to_max_new_tokens(single_process_megatron, tmp_path, norm_length):
    extra = [f"rl.dr_grpo_norm_length={norm_length}"] if norm_length else []
    cfg = _cfg("rl.loss_agg_mode=seq-mean-token-sum-norm", *extra)
    record, _, _ = _step(cfg, tmp_path, reference=False)
    constant = float(norm_length or cfg.rollout.max_new_tokens)
    hand = _by_hand(cfg, lambda tm, batch: torch.tensor(REWARDS), constant)
    assert record["loss"] == pytest.approx(hand.values["loss"], rel=1e-5, abs=1e-8)
    assert record["grad_norm"] == pytest.approx(hand.grad_norm, rel=1e-5)
    other = _by_hand(cfg, lambda tm, batch: torch.tensor(REWARDS), constant * 2)
    assert other.values["loss"] == pytest.approx(record["loss"] / 2, rel=1e-5)  # the constant is what divides


# --------------------------------------------------------------------------- DAPO dynamic sampling


def _run_for(policy: str, rounds: int = 3, per_step: int = 3):
    cfg = _cfg("rl.drop_uniform_groups=true", f"rl.refill_policy={policy}", f"rl.max_refill_rounds={rounds}")
    from r1mega.train.grpo import GRPORun, Prompt

    prompts = [Prompt([1, i], str(i), str(i)) for i in range(64)]
    return GRPORun(cfg, prompts, list(range(64)), per_step, None, None)


def _scripted(informative_by_prompt):
    """``sample(prompts, round)``: prompt i's group is informative (rewards differ) iff the table says so."""
    calls = []

    def sample(prompts, round_):
        calls.append((round_, [p.text for p in prompts]))
        gens, rewards = [], []
        for j, p in enumerate(prompts):
            for k in range(N):
                gens.append(Generation(j, k, [1], [2], "", [0.0]))
                rewards.append(float(k % 2) if informative_by_prompt(int(p.text)) else 1.0)
        return gens, rewards, 0.1, 0.1, 0
    return sample, calls


def test_dynamic_sampling_resamples_until_the_batch_is_full():
    from r1mega.train.schedules import dynamic_sampling

    run = _run_for("resample")
    sample, calls = _scripted(lambda i: i % 3 == 0)  # prompts 0, 3, 6, ... informative
    r = dynamic_sampling(run, 1, sample)
    assert [c[0] for c in calls] == [0, 1, 2] and run.consumed_samples == 9
    assert len(r.gens) == 3 * N and r.train_mask is None and r.groups == [i // N for i in range(3 * N)]
    assert r.metrics["dapo/groups_kept"] == 3 and r.metrics["dapo/groups_dropped"] == 6
    assert r.metrics["dapo/groups_refilled"] == 2 and r.metrics["dapo/rounds"] == 2
    assert all(len(set(r.rewards[g * N:(g + 1) * N])) > 1 for g in range(3))  # only informative groups


def test_dynamic_sampling_duplicate_none_and_exhausted_rounds():
    from r1mega.train.schedules import dynamic_sampling

    sample, calls = _scripted(lambda i: i == 1)
    r = dynamic_sampling(_run_for("duplicate"), 1, sample)
    assert len(calls) == 1 and r.metrics["dapo/groups_refilled"] == 2 and r.train_mask is None
    assert r.groups == [0] * N + [1] * N + [2] * N  # the kept group and two copies, each its own group

    r = dynamic_sampling(_run_for("none"), 1, _scripted(lambda i: i == 1)[0])
    assert r.metrics["dapo/groups_kept"] == 1 and r.metrics["dapo/groups_padded"] == 2
    assert r.train_mask == [True] * N + [False] * (2 * N)  # the shape holds; the copies are out of the loss

    run = _run_for("resample", rounds=1)
    r = dynamic_sampling(run, 1, _scripted(lambda i: i == 4)[0])  # one informative prompt in two rounds
    assert run.consumed_samples == 6 and r.metrics["dapo/rounds"] == 1 and r.metrics["dapo/groups_padded"] == 2
