"""Loss aggregation: hand values per mode, and invariance to micro-batch / data-parallel splits."""

from __future__ import annotations

import pytest
import torch

from r1mega.rl import LOSS_AGG_MODES, aggregate, split_scale, token_weights

# Rows of length 3, 1 and 0 (an empty response): 4 tokens, B = 3.
MASK = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
LOSS = torch.tensor([[1.0, 2, 3, float("nan")], [4, float("inf"), 0, 0], [9, 9, 9, 9]])
NORM = 8.0


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


@pytest.mark.parametrize("mode, row_weights, total", [
    ("token-mean", [1 / 4, 1 / 4, 0], (1 + 2 + 3 + 4) / 4),  # / 4 tokens = 2.5
    ("seq-mean-token-sum", [1 / 3, 1 / 3, 0], (6 + 4) / 3),  # row sums / B = 3.333
    ("seq-mean-token-mean", [1 / 9, 1 / 3, 0], (6 / 3 + 4 / 1 + 0) / 3),  # row means / B = 2
    ("seq-mean-token-sum-norm", [1 / 24, 1 / 24, 0], (6 + 4) / (3 * 8)),  # / (B * 8) = .41667
])
def test_token_weights_hand_values(mode, row_weights, total):
    w = token_weights(MASK, mode, constant_norm=NORM)
    close(w, MASK * torch.tensor(row_weights)[:, None])
    assert torch.isfinite(w).all() and (w[2] == 0).all()  # the empty row contributes nothing
    close(aggregate(LOSS, w), total)  # NaN / inf on zero-weight tokens cannot leak


def test_token_weights_errors_and_all_empty_batch():
    with pytest.raises(ValueError, match="constant_norm"):
        token_weights(MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="token-mean"):
        token_weights(MASK, "mean")
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        token_weights(MASK.reshape(-1), "token-mean")
    for mode in LOSS_AGG_MODES:
        w = token_weights(torch.zeros(2, 3), mode, constant_norm=NORM)
        assert torch.equal(w, torch.zeros(2, 3))


def test_split_scale():
    assert split_scale(4, 2) == 8.0 and split_scale(1, 1) == 1.0
    with pytest.raises(ValueError):
        split_scale(0, 2)


# --------------------------------------------------------------------------- split invariance

B, S, D = 8, 6, 5


def _batch():
    """A tiny 'model': per-token loss = tanh(x @ w) with shared parameters w; uneven lengths, an empty row."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, S, D, generator=g)
    lens = torch.tensor([6, 1, 0, 3, 5, 2, 6, 4])
    mask = (torch.arange(S)[None, :] < lens[:, None]).float()
    w = torch.randn(D, generator=g)
    return x, mask, w


def _per_token(x, w):
    return torch.tanh(x @ w)


def _megatron_like(x, mask, w, weights, num_mb, dp):
    """Loss and grad as the learner will get them: each DP rank runs num_mb micro-batches; megatron
    divides each returned loss by num_mb; DDP averages the per-rank gradients over dp."""
    rows_per_rank, rows_per_mb = B // dp, B // dp // num_mb
    scale = split_scale(num_mb, dp)
    losses, grads = [], []
    for r in range(dp):
        wr = w.detach().clone().requires_grad_()  # each rank holds its own replica
        rank_loss = 0.0
        for k in range(num_mb):
            rows = slice(r * rows_per_rank + k * rows_per_mb, r * rows_per_rank + (k + 1) * rows_per_mb)
            partial = aggregate(_per_token(x[rows], wr), weights[rows])
            rank_loss = rank_loss + scale * partial / num_mb  # megatron: output_tensor /= num_microbatches
        (grad,) = torch.autograd.grad(rank_loss, wr)
        losses.append(rank_loss.detach())
        grads.append(grad)
    return sum(losses) / dp, sum(grads) / dp  # DDP all-reduce average


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_loss_and_grad_do_not_depend_on_the_split(mode):
    x, mask, w = _batch()
    weights = token_weights(mask, mode, constant_norm=NORM)  # once, on the global batch
    w_ref = w.clone().requires_grad_()
    ref = aggregate(_per_token(x, w_ref), weights)
    (ref_grad,) = torch.autograd.grad(ref, w_ref)
    for dp in (1, 2):
        for num_mb in (1, 2, 4):
            loss, grad = _megatron_like(x, mask, w, weights, num_mb, dp)
            close(loss, ref.detach(), tol=1e-6)
            close(grad, ref_grad, tol=1e-6)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_per_token_leaf_gradient_equals_weights_for_every_split(mode):
    # d loss / d per_token_loss must be exactly the global weights, whatever the split
    x, mask, _ = _batch()
    weights = token_weights(mask, mode, constant_norm=NORM)
    tok = torch.randn(B, S).requires_grad_()
    for dp, num_mb in ((1, 1), (2, 2), (2, 4)):
        rows_per_mb = B // dp // num_mb
        total = sum(split_scale(num_mb, dp) * aggregate(tok[i:i + rows_per_mb], weights[i:i + rows_per_mb])
                    / num_mb for i in range(0, B, rows_per_mb)) / dp
        (grad,) = torch.autograd.grad(total, tok)
        close(grad, weights)
        close(total.detach(), aggregate(tok.detach(), weights))


def test_packing_only_masked_tokens_gives_the_same_sum():
    x, mask, w = _batch()
    weights = token_weights(mask, "seq-mean-token-mean")
    loss = _per_token(x, w)
    keep = mask > 0
    close(aggregate(loss[keep], weights[keep]), aggregate(loss, weights))


def test_naive_per_microbatch_token_mean_is_not_invariant():
    # Why global weights exist: normalising each micro-batch by its own tokens changes the loss.
    x, mask, w = _batch()
    ref = aggregate(_per_token(x, w), token_weights(mask, "token-mean"))
    halves = [slice(0, B // 2), slice(B // 2, B)]
    naive = sum(aggregate(_per_token(x[h], w), token_weights(mask[h], "token-mean")) for h in halves) / 2
    assert not torch.allclose(naive, ref, atol=1e-3)
