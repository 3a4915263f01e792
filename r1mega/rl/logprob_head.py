"""Make megatron's GPTModel return final hidden states so log-probs never materialise full logits.

Inside :func:`hidden_state_output` the model's ``output_layer`` returns the (sequence-gathered)
hidden states instead of logits; :func:`token_logprobs` then computes per-token log-probs and
entropy against this rank's vocabulary shard of ``output_layer.weight`` with the chunked
vocab-parallel function. Parameter names and DDP hooks are untouched (only the instance's
``forward`` is swapped for the duration).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

import r1mega.models  # noqa: F401  (readies megatron for this machine)
from r1mega.rl.vocab_parallel import VocabShard, logprob_and_entropy

from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; backward sums the gradient over TP.

    megatron's ``copy_to_tensor_model_parallel_region`` all-reduces ``grad.contiguous()`` and then
    returns the original tensor, so a non-contiguous gradient (e.g. after a transpose) is silently
    left unreduced; this version reduces a contiguous copy and returns it.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _tp_group():
    return parallel_state.get_tensor_model_parallel_group()


@contextmanager
def hidden_state_output(gpt_model):
    """While active, ``gpt_model(...)`` without labels returns hidden states [b, s, h], not logits."""
    layer = getattr(gpt_model, "output_layer", None)
    if layer is None:  # not the last pipeline stage: it returns hidden states anyway
        yield
        return

    def forward(input_, weight=None, runtime_gather_output=None):
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return input_, None
        if layer.sequence_parallel:
            return gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True), None
        return _CopyToTensorParallel.apply(input_, _tp_group()), None

    layer.forward = forward
    try:
        yield
    finally:
        del layer.forward


def vocab_shard(gpt_model, valid_vocab: int) -> VocabShard:
    """This rank's vocabulary range of the output layer; ids >= ``valid_vocab`` are padding."""
    per_rank = gpt_model.output_layer.weight.size(0)
    start = parallel_state.get_tensor_model_parallel_rank() * per_rank
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return VocabShard(start, start + per_rank, _tp_group() if tp > 1 else None, valid_vocab)


def token_logprobs(gpt_model, hidden: torch.Tensor, targets: torch.Tensor, valid_vocab: int,
                   temperature: float = 1.0, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log p(target) and entropy, shaped like ``targets`` ([b, s])."""
    b, s, h = hidden.shape
    logp, entropy = logprob_and_entropy(hidden.reshape(b * s, h), gpt_model.output_layer.weight,
                                        targets.reshape(-1), vocab_shard(gpt_model, valid_vocab),
                                        temperature=temperature, chunk_size=chunk_size)
    return logp.view(b, s), entropy.view(b, s)
