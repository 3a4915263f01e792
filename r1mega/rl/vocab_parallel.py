"""Token log-probabilities and entropy over a TP-sharded vocabulary, chunked over tokens.

RL needs log p(target) and the entropy at every response token. The naive path materialises
[tokens, vocab] logits (8k tokens x 152k vocab = 4.9 GB in fp32) and, under tensor parallelism,
gathers the vocabulary. Here each TP rank keeps its vocabulary shard of the output weight; logits
exist one chunk of tokens at a time; the softmax statistics are combined with three all-reduces of
[chunk] vectors; backward recomputes each chunk's logits instead of saving them. Peak memory is
O(chunk x vocab/tp) instead of O(tokens x vocab).

Gradients: with z the logits, p = softmax(z), the target t and H = -sum p log p,
d log p_t / dz = onehot_t - p and dH/dz = -p (log p + H).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice [start, end) of the (padded) vocabulary, and the TP group holding the rest."""

    start: int
    end: int
    group: object = None  # torch.distributed group; None = no tensor parallelism
    valid_vocab: int | None = None  # ids >= valid_vocab are padding: excluded from the softmax

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.group is not None and dist.get_world_size(self.group) > 1:
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, shard: VocabShard, temperature: float):
    logits = (hidden.float() @ weight.float().t()) / temperature
    if shard.valid_vocab is not None and shard.end > shard.valid_vocab:
        logits[:, max(shard.valid_vocab - shard.start, 0):] = float("-inf")
    return logits


def _forward_chunk(hidden, weight, target, shard: VocabShard, temperature: float):
    """Returns (target logprob, entropy, logZ) for one chunk of tokens."""
    logits = _chunk_logits(hidden, weight, shard, temperature)
    local_max = logits.max(dim=-1).values
    global_max = shard.all_reduce(local_max.clone(), dist.ReduceOp.MAX)
    shifted = logits - global_max[:, None]
    exp = shifted.exp()
    sum_exp = shard.all_reduce(exp.sum(-1))
    log_z = global_max + sum_exp.log()
    # sum_j p_j z_j (for the entropy) and the target's logit, each owned by one vocabulary shard.
    p_dot_z = shard.all_reduce((exp * torch.nan_to_num(logits, neginf=0.0)).sum(-1) / sum_exp)
    in_shard = (target >= shard.start) & (target < shard.end)
    local_idx = (target - shard.start).clamp(0, weight.size(0) - 1)
    target_logit = torch.where(in_shard, logits.gather(1, local_idx[:, None]).squeeze(1), 0.0)
    target_logit = shard.all_reduce(target_logit)
    return target_logit - log_z, log_z - p_dot_z, log_z


class _ChunkedLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, shard, temperature, chunk_size):
        logps, ents, log_zs = [], [], []
        with torch.no_grad():
            for h, t in zip(hidden.split(chunk_size), target.split(chunk_size)):
                lp, ent, lz = _forward_chunk(h, weight, t, shard, temperature)
                logps.append(lp)
                ents.append(ent)
                log_zs.append(lz)
        logp, entropy, log_z = torch.cat(logps), torch.cat(ents), torch.cat(log_zs)
        ctx.save_for_backward(hidden, weight, target, log_z, entropy)
        ctx.shard, ctx.temperature, ctx.chunk_size = shard, temperature, chunk_size
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, target, log_z, entropy = ctx.saved_tensors
        shard, temperature, chunk = ctx.shard, ctx.temperature, ctx.chunk_size
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        for start in range(0, hidden.size(0), chunk):
            sl = slice(start, start + chunk)
            h = hidden[sl]
            logits = _chunk_logits(h, weight, shard, temperature)
            logp_all = logits - log_z[sl, None]
            p = logp_all.exp()
            # d/dz of (g_lp * log p_t + g_H * H)
            grad_z = -grad_logp[sl, None] * p
            grad_z -= grad_entropy[sl, None] * p * (torch.nan_to_num(logp_all, neginf=0.0) + entropy[sl, None])
            t = target[sl]
            in_shard = (t >= shard.start) & (t < shard.end)
            rows = torch.nonzero(in_shard).squeeze(1)
            grad_z[rows, t[rows] - shard.start] += grad_logp[sl][rows]
            grad_z /= temperature
            grad_hidden[sl] = grad_z @ weight.float()
            grad_weight += grad_z.t() @ h.float()
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None, None, None


def logprob_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, shard: VocabShard,
                        temperature: float = 1.0, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(target) and entropy, each [tokens].

    ``hidden`` [tokens, h] must be the full (not sequence-parallel) hidden states, identical on every
    TP rank; the caller makes its gradient sum over TP (megatron's copy/gather region functions).
    ``weight`` [vocab/tp, h] is this rank's output-layer shard. Targets are global vocabulary ids.
    """
    if hidden.dim() != 2 or target.dim() != 1 or hidden.size(0) != target.size(0):
        raise ValueError(f"expected hidden [T, h] and target [T]; got {tuple(hidden.shape)} and {tuple(target.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedLogprobEntropy.apply(hidden, weight, target, shard, float(temperature), int(chunk_size))


def naive_logprob_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                              temperature: float = 1.0, valid_vocab: int | None = None):
    """Reference: full [tokens, vocab] logits in one go (single process). For tests and benchmarks."""
    logits = (hidden.float() @ weight.float().t()) / temperature
    if valid_vocab is not None:
        logits = logits[:, :valid_vocab]
    logp_all = torch.log_softmax(logits, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(1, target[:, None]).squeeze(1), entropy
