"""Logit distillation from stored teacher top-k log-probs: forward KL(teacher || student) with a tail bucket.

The teacher's generations carry, at every response token, its ``k`` most likely ids ``v_1..v_k`` and
their log-probs ``log q(v_i)`` (full-vocabulary normalised, temperature 1: the engine's ``raw`` mode).
The full teacher distribution is not stored, so the KL is taken over ``k + 1`` outcomes: the k ids and
one *tail bucket* holding the rest of the vocabulary,

    KL = sum_i q_i (log q_i - log p_i) + q_tail (log q_tail - log p_tail),
    q_tail = 1 - sum_i q_i,  p_tail = 1 - sum_i p_i,

with ``p_i`` the student's full-vocabulary probabilities of the same ids. Unlike renormalising both
distributions over the k ids, the tail term also penalises the student for mass the teacher puts
outside its top-k, and the value is exactly KL between the two distributions coarsened to k + 1 bins
(so it is >= 0 and 0 only when the coarsened distributions agree). Positions with fewer than k stored
entries pad ``teacher_logp`` with ``-inf`` (probability 0: no contribution).
"""

from __future__ import annotations

import torch

_TAIL_EPS = 1e-6  # keeps log(p_tail) finite when the student puts (numerically) all its mass on the k ids


def topk_forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(teacher || student) over the teacher's top-k ids plus a tail bucket.

    ``student_logp``, ``teacher_logp``: [..., k] log-probs of the same ids (student differentiable).
    Returns [...] (float32, or float64 for float64 inputs).
    """
    if student_logp.shape != teacher_logp.shape:
        raise ValueError(f"student {tuple(student_logp.shape)} and teacher {tuple(teacher_logp.shape)} top-k "
                         f"log-probs must have the same shape")
    dtype = torch.float64 if student_logp.dtype == torch.float64 else torch.float32
    present = torch.isfinite(teacher_logp)  # -inf pads a position with fewer than k entries: absent for both
    s = student_logp.to(dtype).masked_fill(~present, 0.0)
    t = teacher_logp.to(dtype).masked_fill(~present, 0.0)
    q, p = t.exp() * present, s.exp() * present
    head = (q * (t - s)).sum(-1)
    q_tail = (1.0 - q.sum(-1)).clamp(min=0.0)
    p_tail = (1.0 - p.sum(-1)).clamp(min=_TAIL_EPS)
    tail = torch.xlogy(q_tail, q_tail) - q_tail * p_tail.log()
    return head + tail
