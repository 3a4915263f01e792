"""Chunked vocab-parallel log-probs and entropy: same values and gradients as full logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from r1mega.platform.spawn import spawn_ranks
from r1mega.rl.vocab_parallel import VocabShard, logprob_and_entropy, naive_logprob_and_entropy


@pytest.mark.parametrize("valid_vocab", [None, 90])
@pytest.mark.parametrize("chunk_size", [1, 8, 1000])
def test_single_rank_matches_full_logits(valid_vocab, chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(100, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 90, (37,))
    g1, g2 = torch.randn(37, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    lp, ent = logprob_and_entropy(hidden, weight, target, VocabShard(0, 100, None, valid_vocab), 0.7, chunk_size)
    (lp * g1 + ent * g2).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    lp_ref, ent_ref = naive_logprob_and_entropy(hidden, weight, target, 0.7, valid_vocab)
    (lp_ref * g1 + ent_ref * g2).sum().backward()
    assert lp.dtype == ent.dtype == torch.float64  # float64 weights keep float64 statistics
    torch.testing.assert_close(lp, lp_ref.double(), atol=2e-5, rtol=1e-5)  # the reference runs in float32
    torch.testing.assert_close(ent, ent_ref.double(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1], weight.grad, atol=5e-5, rtol=1e-4)
    if valid_vocab is not None:  # padded ids get no probability mass, hence no gradient
        assert grads[1][valid_vocab:].abs().max() == 0


def test_entropy_of_uniform_logits_is_log_vocab():
    hidden = torch.zeros(3, 4)
    weight = torch.randn(50, 4)
    _, ent = logprob_and_entropy(hidden, weight, torch.zeros(3, dtype=torch.long), VocabShard(0, 50))
    torch.testing.assert_close(ent, torch.full((3,), float(torch.log(torch.tensor(50.0)))))


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="expected hidden"):
        logprob_and_entropy(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long), VocabShard(0, 5))


@pytest.mark.timeout(120)
def test_tp2_matches_single_process(tmp_path):
    out = tmp_path / "err"
    spawn_ranks([str(Path(__file__).with_name("vocab_parallel_worker.py")), str(out)], world_size=2,
                timeout_s=90, name="vocab-parallel")
    for rank in range(2):
        err = json.loads(Path(f"{out}.{rank}").read_text())
        assert max(err.values()) < 1e-4, err
