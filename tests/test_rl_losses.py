"""Policy losses (PPO-clip, dual-clip, GSPO), KL estimators and rollout/trainer mismatch (TIS)."""

from __future__ import annotations

import math

import pytest
import torch

from r1mega.config import RLConfig
from r1mega.rl import (
    clip_range,
    entropy_bonus,
    kl_penalty,
    mismatch_metrics,
    policy_loss,
    tis_weights,
    token_weights,
)

EPS_LOW, EPS_HIGH = 0.2, 0.28


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- KL


def test_kl_estimators_hand_values():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    close(kl_penalty(logp, ref, "k1"), [0.5, -1.0, 0.0])  # logp - ref
    close(kl_penalty(logp, ref, "k2"), [0.125, 0.5, 0.0])  # .5 * diff^2
    # k3 with x = ref - logp = [-.5, 1, 0]: e^-.5 + .5 - 1 = .106531; e^1 - 1 - 1 = .718282; 0
    close(kl_penalty(logp, ref, "k3"), [math.exp(-0.5) - 0.5, math.e - 2.0, 0.0])
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_kl_estimates():
    # E_{y~p}[k] over a 5-token vocabulary, exactly: both equal KL(p || q); k3 has E_p[q/p] = 1.
    p = torch.softmax(torch.tensor([0.3, -1.0, 2.0, 0.0, 0.5], dtype=torch.float64), 0)
    q = torch.softmax(torch.tensor([1.0, 0.2, -0.5, 0.0, 0.1], dtype=torch.float64), 0)
    kl = (p * (p.log() - q.log())).sum()
    for est in ("k1", "k3"):
        close((p * kl_penalty(p.log(), q.log(), est)).sum(), kl, tol=1e-12)


def test_k3_is_nonnegative_finite_and_has_the_right_gradient():
    torch.manual_seed(0)
    logp = (torch.randn(10_000) * 3).requires_grad_()
    ref = torch.randn(10_000) * 3
    k3 = kl_penalty(logp, ref, "k3")
    assert (k3 >= 0).all()
    k3.sum().backward()
    close(logp.grad, 1.0 - torch.exp(ref - logp.detach()), tol=1e-4)  # d/dlogp = 1 - e^(ref - logp)
    tiny = kl_penalty(torch.full((4,), 3e-8), torch.zeros(4), "k3")  # exp() rounding would go below 0
    assert (tiny >= 0).all()
    extreme = kl_penalty(torch.tensor([0.0, -1000.0]), torch.tensor([-1000.0, 0.0]), "k3")
    close(extreme, [math.exp(-20) + 20 - 1, math.exp(20) - 20 - 1])  # clamped to [-20, 20], finite


# --------------------------------------------------------------------------- PPO


def _ppo_case():
    """(A, ratio) per token -> expected loss and d loss / d logp. eps_low .2, eps_high .28."""
    cases = [  # A, ratio, loss, grad, clipped-high, clipped-low
        (1.0, 1.1, -1.1, -1.1, 0, 0),  # inside: -A r, grad -A r
        (1.0, 1.5, -1.28, 0.0, 1, 0),  # A>0 above 1.28: clipped to -A * 1.28, no gradient
        (1.0, 0.5, -0.5, -0.5, 0, 0),  # A>0 below 0.8: max(-.5, -.8) = -.5, not clipped
        (-1.0, 1.1, 1.1, 1.1, 0, 0),  # inside
        (-1.0, 0.5, 0.8, 0.0, 0, 1),  # A<0 below 0.8: max(.5, .8) = .8, clipped
        (-1.0, 1.5, 1.5, 1.5, 0, 0),  # A<0 above: max(1.5, 1.28) = 1.5, not clipped (dual-clip's job)
        (2.0, 1.2, -2.4, -2.4, 0, 0),  # scales with A
    ]
    adv, ratio, loss, grad, high, low = (torch.tensor(c, dtype=torch.float32) for c in zip(*cases))
    return adv, ratio, loss, grad, high, low


def test_ppo_clip_values_gradients_and_metrics():
    adv, ratio, exp_loss, exp_grad, high, low = _ppo_case()
    old = torch.full_like(ratio, -2.0)
    logp = (old + ratio.log()).requires_grad_()
    loss, metrics = policy_loss("ppo", logp, old, adv, torch.ones_like(adv), eps_low=EPS_LOW, eps_high=EPS_HIGH)
    close(loss, exp_loss)
    loss.sum().backward()
    close(logp.grad, exp_grad)
    close(metrics["clip_frac_high"], high.mean())
    close(metrics["clip_frac_low"], low.mean())
    close(metrics["clip_frac"], 2 / 7)
    close(metrics["dual_clip_frac"], 0.0)
    close(metrics["approx_kl"], (-ratio.log()).mean())  # mean(old - logp)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


def test_ppo_dual_clip_caps_negative_advantage_loss():
    # c = 3: A=-1, r=5 -> max(5, 1.28) = 5 capped at 3 (no grad); A=-1, r=2 -> 2 (< 3, grad 2);
    # A=+1, r=5 -> -1.28 (dual-clip never touches A > 0); A=-2, r=4 -> 8 capped at 6
    adv = torch.tensor([-1.0, -1.0, 1.0, -2.0])
    ratio = torch.tensor([5.0, 2.0, 5.0, 4.0])
    logp = ratio.log().requires_grad_()
    loss, metrics = policy_loss("ppo", logp, torch.zeros(4), adv, torch.ones(4), eps_low=EPS_LOW,
                                eps_high=EPS_HIGH, dual_clip_c=3.0)
    close(loss, [3.0, 2.0, -1.28, 6.0])
    loss.sum().backward()
    close(logp.grad, [0.0, 2.0, 0.0, 0.0])
    close(metrics["dual_clip_frac"], 0.5)
    with pytest.raises(ValueError, match="dual_clip_c"):
        policy_loss("ppo", logp, torch.zeros(4), adv, torch.ones(4), eps_low=0.2, eps_high=0.2, dual_clip_c=1.0)


def test_masked_tokens_with_garbage_give_zero_loss_and_finite_grad():
    logp = torch.tensor([[-1.0, -float("inf")], [-0.5, float("nan")]], requires_grad=True)
    old = torch.tensor([[-1.2, 0.0], [-0.5, float("nan")]])
    adv = torch.tensor([[1.0, float("nan")], [-1.0, -1.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    for name in ("ppo", "gspo"):
        loss, metrics = policy_loss(name, logp, old, adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH)
        assert loss[0, 1] == 0 and loss[1, 1] == 0 and torch.isfinite(loss).all()
        (grad,) = torch.autograd.grad(loss.sum(), logp)
        assert torch.isfinite(grad).all() and grad[0, 1] == 0 and grad[1, 1] == 0
        assert all(torch.isfinite(v) for v in metrics.values())


def test_tis_weights_multiply_the_loss_and_stay_constant():
    adv, ratio, exp_loss, exp_grad, *_ = _ppo_case()
    logp = ratio.log().requires_grad_()
    w = torch.linspace(0.5, 2.0, len(adv)).requires_grad_()
    loss, _ = policy_loss("ppo", logp, torch.zeros_like(adv), adv, torch.ones_like(adv), eps_low=EPS_LOW,
                          eps_high=EPS_HIGH, tis_weights=w)
    close(loss, exp_loss * w.detach())
    loss.sum().backward()
    close(logp.grad, exp_grad * w.detach())
    assert w.grad is None  # used as a constant


def test_policy_loss_argument_errors():
    x = torch.zeros(3)
    with pytest.raises(KeyError, match="gspo"):
        policy_loss("nope", x, x, x, x, eps_low=0.2, eps_high=0.2)
    with pytest.raises(ValueError, match="shape"):
        policy_loss("ppo", x, x, torch.zeros(2), x, eps_low=0.2, eps_high=0.2)
    with pytest.raises(ValueError, match="seq_ids"):
        policy_loss("gspo", x, x, x, torch.ones(3), eps_low=0.2, eps_high=0.2)  # [T] needs seq_ids


def test_entropy_bonus_and_clip_range():
    close(entropy_bonus(torch.tensor([1.0, 2.5]), 0.01), [-0.01, -0.025])
    assert clip_range(RLConfig()) == (0.2, 0.28)
    assert clip_range(RLConfig(policy_loss="gspo")) == (3e-4, 4e-4)


# --------------------------------------------------------------------------- GSPO


def test_gspo_equals_ppo_when_every_sequence_has_one_token():
    torch.manual_seed(1)
    old = torch.randn(12)
    logp_ppo = (old + 0.4 * torch.randn(12)).requires_grad_()
    logp_gspo = logp_ppo.detach().clone().requires_grad_()
    adv, mask = torch.randn(12), (torch.rand(12) > 0.2).float()
    kw = dict(eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip_c=3.0)
    l_ppo, m_ppo = policy_loss("ppo", logp_ppo, old, adv, mask, **kw)
    l_gspo, m_gspo = policy_loss("gspo", logp_gspo, old, adv, mask, seq_ids=torch.arange(12), **kw)
    close(l_gspo, l_ppo)
    l_ppo.sum().backward()
    l_gspo.sum().backward()
    close(logp_gspo.grad, logp_ppo.grad)
    for key in m_ppo:
        close(m_gspo[key], m_ppo[key])


# Four sequences as rows of [B, S] (lengths 3, 2, 4, 0); per-token shifts chosen so the
# sequence log-ratios are .01 (s=1.01, inside), .1 (s=1.105 > 1.05, A>0: clipped),
# -.1 (s=.905 < .95, A<0: clipped), and row 3 is empty. eps .05 / .05.
SHIFT = torch.tensor([[0.01, -0.02, 0.04, 0.0], [0.05, 0.15, 0.0, 0.0], [-0.3, 0.1, -0.2, 0.0], [0.0] * 4])
GSPO_MASK = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
GSPO_ADV = torch.tensor([0.7, 1.3, -0.9, 2.0])
GSPO_EPS = 0.05


def _gspo_sequence_objective(logp, old, adv, mask, eps):
    """The paper's formula: J = mean_i max(-A_i s_i, -A_i clip(s_i)), s_i = exp(mean_t (logp - old))."""
    lens = mask.sum(1)
    s = torch.exp(((logp - old) * mask).sum(1) / lens.clamp(min=1))
    per_seq = torch.maximum(-adv * s, -adv * torch.clamp(s, 1 - eps, 1 + eps))
    return torch.where(lens > 0, per_seq, torch.zeros_like(per_seq)).sum() / len(lens)


def test_gspo_token_loss_matches_the_sequence_level_objective():
    torch.manual_seed(2)
    old = torch.randn(4, 4) - 2
    logp = (old + SHIFT).requires_grad_()
    logp_ref = logp.detach().clone().requires_grad_()
    adv_tok = GSPO_ADV[:, None].expand(4, 4)
    loss, metrics = policy_loss("gspo", logp, old, adv_tok, GSPO_MASK, eps_low=GSPO_EPS, eps_high=GSPO_EPS)
    w = token_weights(GSPO_MASK, "seq-mean-token-mean")  # 1 / (len_i * B): GSPO's aggregation
    total = (loss * w).sum()
    ref = _gspo_sequence_objective(logp_ref, old, GSPO_ADV, GSPO_MASK, GSPO_EPS)
    close(total, ref)
    total.backward()
    ref.backward()
    close(logp.grad, logp_ref.grad)
    # analytic: unclipped row 0 gets -A s / (len * B) on each token; clipped rows 1, 2 and empty row 3 get 0
    s0 = math.exp(0.01)
    expected = torch.zeros(4, 4)
    expected[0, :3] = -0.7 * s0 / (3 * 4)
    close(logp.grad, expected)
    close(metrics["clip_frac_high"], 2 / 9)  # row 1's two tokens of the 9 response tokens
    close(metrics["clip_frac_low"], 4 / 9)  # row 2's four tokens


def test_gspo_packed_interleaved_seq_ids_match_rows():
    torch.manual_seed(3)
    old = torch.randn(4, 4) - 2
    logp_rows = (old + SHIFT).requires_grad_()
    adv_tok = GSPO_ADV[:, None].expand(4, 4)
    kw = dict(eps_low=GSPO_EPS, eps_high=GSPO_EPS)
    loss_rows, _ = policy_loss("gspo", logp_rows, old, adv_tok, GSPO_MASK, **kw)
    # pack the 16 tokens in a shuffled order; padding tokens get seq id -1
    perm = torch.randperm(16)
    ids = torch.where(GSPO_MASK > 0, torch.arange(4)[:, None].expand(4, 4), -1).reshape(-1)[perm]
    logp_packed = logp_rows.detach().reshape(-1)[perm].requires_grad_()
    loss_packed, _ = policy_loss("gspo", logp_packed, old.reshape(-1)[perm], adv_tok.reshape(-1)[perm],
                                 torch.ones(16), seq_ids=ids, **kw)  # mask all 1: seq_ids -1 must mask
    close(loss_packed, loss_rows.detach().reshape(-1)[perm])
    g = torch.randn(16)
    (loss_rows.reshape(-1)[perm] * g).sum().backward()
    (loss_packed * g).sum().backward()
    close(logp_packed.grad, logp_rows.grad.reshape(-1)[perm])


# --------------------------------------------------------------------------- rollout / trainer mismatch


def test_tis_weights_are_capped_masked_and_detached():
    # old - rollout = [0, ln 1.5, ln 3, -ln 2, (masked)] -> [1, 1.5, min(3, 2) = 2, .5, 0]
    rollout = torch.tensor([-1.0, -2.0, -3.0, -0.5, -1.0])
    old = (rollout + torch.tensor([0.0, math.log(1.5), math.log(3.0), -math.log(2.0), 5.0])).requires_grad_()
    mask = torch.tensor([1.0, 1, 1, 1, 0])
    w = tis_weights(old, rollout, mask, cap=2.0)
    close(w, [1.0, 1.5, 2.0, 0.5, 0.0])
    assert not w.requires_grad
    close(tis_weights(old, rollout, mask, cap=None), [1.0, 1.5, 3.0, 0.5, 0.0])


def test_mismatch_metrics_hand_values():
    rollout = torch.tensor([[-1.0, -2.0, -3.0, -0.5, -7.0]])
    d = torch.tensor([[0.0, math.log(1.5), math.log(3.0), -math.log(2.0), 9.0]])  # last token masked
    mask = torch.tensor([[1.0, 1, 1, 1, 0]])
    m = mismatch_metrics(rollout + d, rollout, mask, cap=2.0)
    ad = [0.0, math.log(1.5), math.log(3.0), math.log(2.0)]
    close(m["mismatch_abs_mean"], sum(ad) / 4)
    close(m["mismatch_abs_max"], math.log(3.0))
    # k3 with x = trainer - rollout: e^x - x - 1 = [0, .094535, .901388, .193147] -> mean .297268
    k3 = [0.0, 1.5 - math.log(1.5) - 1, 3 - math.log(3.0) - 1, 0.5 + math.log(2.0) - 1]
    close(m["mismatch_kl"], sum(k3) / 4)
    close(m["tis_clip_frac"], 0.25)
    empty = mismatch_metrics(rollout, rollout + 1, torch.zeros_like(mask), cap=2.0)
    assert all(v == 0 for v in empty.values())
    assert "tis_clip_frac" not in mismatch_metrics(rollout, rollout, mask)
