"""Token log-probabilities and entropy over a TP-sharded vocabulary, chunked over tokens.

RL needs log p(target) and the entropy at every response token. The naive path materialises
[tokens, vocab] logits (8k tokens x 152k vocab = 4.9 GB in fp32) and, under tensor parallelism,
gathers the vocabulary. Here each TP rank keeps its vocabulary shard of the output weight; logits
exist one chunk of tokens at a time; the softmax statistics are combined with three all-reduces of
[chunk] vectors; backward recomputes each chunk's logits instead of saving them. Peak memory is
O(chunk x vocab/tp) instead of O(tokens x vocab).

With the compiled ops available (``r1mega.kernels``; C++ on CPU, CUDA on GPUs) the same function
runs through ``csrc/fused_logprob_*``, which also tiles the vocabulary; ``impl`` forces a path.

Gradients: with z the logits, p = softmax(z), the target t and H = -sum p log p,
d log p_t / dz = onehot_t - p and dH/dz = -p (log p + H).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from r1mega.kernels import KernelBuildError, fused_logprob_and_entropy, ops_for


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


def _valid_rows(weight: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """The shard's rows for real vocabulary ids (padding rows never enter the softmax)."""
    if shard.valid_vocab is None or shard.end <= shard.valid_vocab:
        return weight
    return weight[: max(shard.valid_vocab - shard.start, 0)]


def _stats_dtype(weight: torch.Tensor) -> torch.dtype:
    """Softmax statistics in fp32, or fp64 for fp64 weights (the same rule as the compiled op)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _chunk_logits(hidden, weight, temperature: float) -> torch.Tensor:
    # Same precision as megatron's output layer (matmul in the weights' dtype), softmax in fp32.
    logits = (hidden.to(weight.dtype) @ weight.t()).to(_stats_dtype(weight))
    return logits.div_(temperature) if temperature != 1.0 else logits


def _forward_chunk(hidden, weight, target, shard: VocabShard, temperature: float):
    """Returns (target logprob, entropy, logZ) for one chunk of tokens; two [chunk, vocab] buffers."""
    rows = weight.size(0)
    if rows:
        logits = _chunk_logits(hidden, weight, temperature)
        local_max = logits.max(dim=-1).values
    else:  # this shard holds only padding ids
        logits = hidden.new_zeros(hidden.size(0), 0, dtype=_stats_dtype(weight))
        local_max = torch.full((hidden.size(0),), float("-inf"), dtype=logits.dtype, device=hidden.device)
    global_max = shard.all_reduce(local_max.clone(), dist.ReduceOp.MAX)
    exp = (logits - global_max[:, None]).exp_()
    sum_exp = shard.all_reduce(exp.sum(-1))
    log_z = global_max + sum_exp.log()
    # sum_j p_j z_j (for the entropy) and the target's logit, each owned by one vocabulary shard.
    p_dot_z = shard.all_reduce(torch.einsum("tv,tv->t", exp, logits) / sum_exp)
    in_shard = (target >= shard.start) & (target < shard.start + rows)
    local_idx = (target - shard.start).clamp(0, max(rows - 1, 0))
    picked = logits.gather(1, local_idx[:, None]).squeeze(1) if rows else torch.zeros_like(log_z)
    target_logit = shard.all_reduce(torch.where(in_shard, picked, 0.0))
    return target_logit - log_z, log_z - p_dot_z, log_z


class _ChunkedLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, shard, temperature, chunk_size):
        w = _valid_rows(weight, shard)
        logps, ents, log_zs = [], [], []
        with torch.no_grad():
            for h, t in zip(hidden.split(chunk_size), target.split(chunk_size)):
                lp, ent, lz = _forward_chunk(h, w, t, shard, temperature)
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
        w = _valid_rows(weight, shard)
        rows = w.size(0)
        acc = _stats_dtype(weight)
        grad_hidden = torch.zeros_like(hidden, dtype=acc)
        grad_weight = torch.zeros_like(weight, dtype=acc)
        if rows == 0:
            return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None, None, None
        w_float = w.to(acc)
        for start in range(0, hidden.size(0), chunk):
            sl = slice(start, start + chunk)
            h = hidden[sl]
            g_lp, g_h = grad_logp[sl, None], grad_entropy[sl, None]
            logp_all = _chunk_logits(h, w, temperature).sub_(log_z[sl, None])  # buffer A: log p
            p = logp_all.exp()  # buffer B
            # dL/dz = g_lp (onehot - p) - g_H p (log p + H) = -p (g_lp + g_H (log p + H)) + g_lp onehot
            coeff = logp_all.add_(entropy[sl, None]).mul_(g_h).add_(g_lp)
            grad_z = p.mul_(coeff).neg_()
            del logp_all, coeff
            t = target[sl]
            hit = torch.nonzero((t >= shard.start) & (t < shard.start + rows)).squeeze(1)
            grad_z[hit, t[hit] - shard.start] += grad_logp[sl][hit]
            if temperature != 1.0:
                grad_z.div_(temperature)
            grad_hidden[sl] = grad_z @ w_float
            grad_weight[:rows].addmm_(grad_z.t(), h.to(acc))
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None, None, None


def logprob_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, shard: VocabShard,
                        temperature: float = 1.0, chunk_size: int = 1024,
                        impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(target) and entropy, each [tokens].

    ``hidden`` [tokens, h] must be the full (not sequence-parallel) hidden states, identical on every
    TP rank; the caller makes its gradient sum over TP (megatron's copy/gather region functions).
    ``weight`` [vocab/tp, h] is this rank's output-layer shard. Targets are global vocabulary ids.
    ``impl``: ``auto`` (compiled op when it serves this device, see ``r1mega.kernels``), ``torch``
    or ``ext``.
    """
    if hidden.dim() != 2 or target.dim() != 1 or hidden.size(0) != target.size(0):
        raise ValueError(f"expected hidden [T, h] and target [T]; got {tuple(hidden.shape)} and {tuple(target.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if impl not in ("auto", "torch", "ext"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'ext', got {impl!r}")
    if impl == "ext" and not ops_for(hidden.device):
        raise KernelBuildError(f"impl='ext' but the compiled ops do not serve {hidden.device.type} tensors "
                               "(see the r1mega kernels log line); use impl='auto'")
    if impl == "ext" or (impl == "auto" and ops_for(hidden.device)):
        valid_rows = _valid_rows(weight, shard).size(0)
        return fused_logprob_and_entropy(hidden, weight, target, shard, valid_rows, temperature, chunk_size)
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
