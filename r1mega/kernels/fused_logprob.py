"""Per-token log p(target) and entropy through the compiled fused op (``csrc/fused_logprob_*``).

Same contract as the pure-torch path in ``r1mega.rl.vocab_parallel`` (which picks between the
two): the op returns each vocabulary shard's softmax statistics (max, rescaled sums, target logit)
and this module combines the shards of a tensor-parallel vocabulary with four all-reduces of
[tokens] vectors. The op tiles [token_chunk, vocab_chunk] blocks, so neither the [tokens, vocab]
logits nor a full chunk of them is ever allocated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# [token_chunk, vocab_chunk] fp32 block: 256 x 4096 x 4 B = 4 MiB on CPU (stays in cache);
# larger on GPUs where the block must feed cuBLAS well.
DEFAULT_VOCAB_CHUNK = {"cpu": 4096, "cuda": 32768}


def _combine(shard, m, s, u, t):
    """All-reduce the per-shard statistics into (logp, entropy, log_z) over the whole vocabulary."""
    global_max = shard.all_reduce(m.clone(), dist.ReduceOp.MAX)
    rescale = torch.exp(m - global_max)  # 0 for a shard without rows (m = -inf)
    sum_exp = shard.all_reduce(s * rescale)
    p_dot_z = shard.all_reduce(u * rescale) / sum_exp
    target_logit = shard.all_reduce(t.clone())
    log_z = global_max + sum_exp.log()
    return target_logit - log_z, log_z - p_dot_z, log_z


class FusedLogprobEntropy(torch.autograd.Function):
    """On CPU, when the whole op is one block (tokens <= ``token_chunk``, shard vocabulary <= ``vocab_chunk``:
    small vocabularies such as the demo's 512) and a gradient will flow, the block of logits is kept from the
    forward for the backward instead of being recomputed (``fused_logprob_block_forward/backward``: the C++
    ops' own driver over that one block): one GEMM fewer per micro-batch, the same values bit for bit, and
    no more memory than one block, which the recomputing backward allocates anyway."""

    @staticmethod
    def forward(ctx, hidden, weight, valid_rows: int, target, shard, temperature: float, token_chunk: int,
                vocab_chunk: int):
        w = weight[:valid_rows]
        ctx.block = None
        if (hidden.device.type == "cpu" and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
                and 0 < hidden.size(0) <= token_chunk and 0 < valid_rows <= vocab_chunk):
            m, s, u, t, ctx.block = torch.ops.r1mega.fused_logprob_block_forward(hidden, w, target, shard.start,
                                                                                 temperature)
        else:
            m, s, u, t = torch.ops.r1mega.fused_logprob_forward(hidden, w, target, shard.start, temperature,
                                                                 token_chunk, vocab_chunk)
        logp, entropy, log_z = _combine(shard, m, s, u, t)
        ctx.save_for_backward(hidden, weight, target, log_z, entropy)
        ctx.settings = (valid_rows, shard.start, temperature, token_chunk, vocab_chunk)
        out_dtype = torch.float64 if m.dtype == torch.float64 else torch.float32
        return logp.to(out_dtype), entropy.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, target, log_z, entropy = ctx.saved_tensors
        valid_rows, start, temperature, token_chunk, vocab_chunk = ctx.settings
        z, ctx.block = ctx.block, None  # turned into dL/dz in place: a second backward recomputes
        if z is not None:
            grad_hidden, grad_w = torch.ops.r1mega.fused_logprob_block_backward(
                z, hidden, weight[:valid_rows], target, start, log_z, entropy, grad_logp.contiguous(),
                grad_entropy.contiguous(), temperature)
        else:
            grad_hidden, grad_w = torch.ops.r1mega.fused_logprob_backward(
                hidden, weight[:valid_rows], target, start, log_z, entropy, grad_logp.contiguous(),
                grad_entropy.contiguous(), temperature, token_chunk, vocab_chunk)
        grad_weight = grad_w.new_zeros(weight.shape) if valid_rows < weight.size(0) else grad_w
        if valid_rows < weight.size(0):
            grad_weight[:valid_rows] = grad_w
        return (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None, None, None, None, None)


def fused_logprob_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, shard,
                              valid_rows: int, temperature: float = 1.0, token_chunk: int = 1024,
                              vocab_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``shard`` is an ``r1mega.rl.vocab_parallel.VocabShard`` (``start`` and ``all_reduce``);
    rows ``>= valid_rows`` of ``weight`` are vocabulary padding and never enter the softmax."""
    vocab_chunk = vocab_chunk or DEFAULT_VOCAB_CHUNK.get(hidden.device.type, 4096)
    return FusedLogprobEntropy.apply(hidden, weight, int(valid_rows), target, shard, float(temperature),
                                     int(token_chunk), int(vocab_chunk))
