"""Distillation: the top-k forward-KL term (hand-computed values, and inside the SFT learner step, packed and
padded), resumable teacher generation (interrupted + rerun == uninterrupted), the tokenizer check, and the
`distill` stage/config plumbing."""

from __future__ import annotations

import math

import pytest
import torch

from r1mega.rl.distill_loss import topk_forward_kl

LN = math.log


def test_topk_forward_kl_matches_a_hand_computed_value():
    # teacher q = [.5, .3, .1, .05, .05] keeps its top-2 ids; the student gives them p = [.4, .2]
    teacher = torch.tensor([[LN(0.5), LN(0.3)]])
    student = torch.tensor([[LN(0.4), LN(0.2)]], requires_grad=True)
    # .5 ln(.5/.4) + .3 ln(.3/.2) + tail .2 ln(.2/.4)
    expected = 0.5 * LN(0.5 / 0.4) + 0.3 * LN(0.3 / 0.2) + 0.2 * LN(0.2 / 0.4)
    assert expected == pytest.approx(0.0945819, abs=1e-6)
    kl = topk_forward_kl(student, teacher)
    assert kl.shape == (1,) and kl.item() == pytest.approx(expected, abs=1e-6)
    # d KL / d log p_i = -q_i + q_tail * p_i / p_tail
    kl.sum().backward()
    want = [-0.5 + 0.2 * 0.4 / 0.4, -0.3 + 0.2 * 0.2 / 0.4]
    assert student.grad[0].tolist() == pytest.approx(want, abs=1e-5)
    # a position with fewer entries pads with -inf: the missing id counts for neither side
    padded = topk_forward_kl(torch.tensor([[LN(0.4), LN(0.2), -3.0]]), torch.tensor([[LN(0.5), LN(0.3), -math.inf]]))
    assert padded.item() == pytest.approx(expected, abs=1e-6)
    # equal coarsened distributions: 0; a student that matches only after renormalising still pays the tail
    assert topk_forward_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    assert topk_forward_kl(torch.tensor([[LN(0.625), LN(0.375)]]) - 0.0, teacher).item() > 0.1


def _teacher_topk(tokens: torch.Tensor, vocab: int, k: int, seed: int = 0):
    """Teacher top-k ids/log-probs at every label position of ``tokens`` from a random distribution."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens.size(0), tokens.size(1) - 1, vocab, generator=gen) * 2
    logp = logits.log_softmax(-1)
    top = logp.topk(k, dim=-1)
    return top.indices, top.values


@pytest.mark.timeout(120)
def test_sft_step_adds_the_distillation_kl_padded_and_packed(single_process_megatron):
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig, OptimizerConfig, ParallelConfig
    from r1mega.rl.learner import LearnerBatch, LearnerSettings, learner_step
    from r1mega.train.model_setup import build_training_model

    model = resolve_model(ModelConfig(preset="qwen3"))
    tm = build_training_model(model, ParallelConfig(), OptimizerConfig(lr=1e-3), total_steps=2)
    vocab = model.vocab_size
    tokens = torch.randint(1, vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([9, 6])
    mask = torch.zeros(2, 8)
    mask[0, 3:8], mask[1, 2:5] = 1, 1  # response positions (row 1 is 6 tokens long)
    ids, logp = _teacher_topk(tokens, vocab, 3)
    logp[0, 4, 2] = -math.inf  # one position with only 2 stored entries
    batch = LearnerBatch(tokens, mask, lengths=lengths, teacher_ids=ids, teacher_logp=logp)

    # the reference, from full logits: token-mean over response tokens of NLL + coef * KL
    with torch.no_grad():
        positions = torch.arange(8).unsqueeze(0).expand(2, 8)
        full = tm.module(tokens[:, :-1].contiguous(), positions, None)[..., :vocab].float().log_softmax(-1)
    nll = -full.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    kl = topk_forward_kl(full.gather(-1, ids), logp)
    coef = 0.5
    want_nll = float((nll * mask).sum() / mask.sum())
    want = float(((nll + coef * kl) * mask).sum() / mask.sum())
    assert float((kl * mask).sum()) > 0

    for pack in (False, True):
        s = LearnerSettings(micro_batch_size=2, valid_vocab=vocab, pack=pack, distill_coef=coef)
        got = learner_step(tm, batch, s, None, forward_only=True).values
        assert got["loss"] == pytest.approx(want, rel=1e-4), pack
        assert got["nll"] == pytest.approx(want_nll, rel=1e-4)
        assert got["distill_kl"] == pytest.approx(float((kl * mask).sum() / mask.sum()), rel=1e-4)
    plain = learner_step(tm, batch, LearnerSettings(micro_batch_size=2, valid_vocab=vocab), None, forward_only=True)
    assert plain.values["loss"] == pytest.approx(want_nll, rel=1e-4) and "distill_kl" not in plain.values
    with pytest.raises(ValueError, match="needs LearnerBatch.teacher_ids"):
        learner_step(tm, LearnerBatch(tokens, mask), LearnerSettings(2, vocab, distill_coef=1.0), None,
                     forward_only=True)
