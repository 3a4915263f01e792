"""Context parallelism (CP): every sequence is split over the ``cp`` ranks of a CP group.

Layout (megatron's, load-balanced for causal attention): a sequence of length ``L`` (a multiple of
``2 * cp``) is cut into ``2 * cp`` equal chunks and CP rank ``r`` holds chunks ``r`` and
``2 * cp - 1 - r``, so every rank has the same share of the causal mask's work. Packed (THD) rows
apply this to every segment of ``cu_seqlens`` (each segment a multiple of ``2 * cp``); this is the
layout megatron's rotary embedding assumes under CP (``get_pos_emb_on_this_cp_rank``,
``_get_thd_freqs_on_this_cp_rank``) and Transformer Engine's CP attention expects.

Attention without Transformer Engine (``local_layers.SDPAttention``) follows Llama 3: all-gather K
and V over the CP group (:class:`GatherFromContextParallel`; its backward reduce-scatters dK and dV,
since every rank's queries attend to every rank's keys) and attend this rank's queries to all keys,
masked causally by *global* position (and by segment when packed).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from megatron.core import parallel_state  # noqa: E402


def cp_size() -> int:
    return parallel_state.get_context_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1


def cp_rank() -> int:
    return parallel_state.get_context_parallel_rank() if cp_size() > 1 else 0


def cp_group():
    return parallel_state.get_context_parallel_group()


def _bounds(cu_seqlens: torch.Tensor | Sequence[int]) -> list[int]:
    return [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]


def token_index(cu_seqlens: torch.Tensor | Sequence[int], cp: int, rank: int) -> torch.Tensor:
    """Global positions (in ``[0, cu_seqlens[-1])``) that CP ``rank`` holds, in its local order: for each
    segment, chunk ``rank`` then chunk ``2*cp-1-rank`` of the segment's ``2*cp`` chunks."""
    bounds = _bounds(cu_seqlens)
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        if length % (2 * cp):
            raise ValueError(f"a sequence segment of {length} tokens does not split into 2*cp={2 * cp} chunks: "
                             "pad every sequence to a multiple of 2*cp")
        chunk = length // (2 * cp)
        for c in (rank, 2 * cp - 1 - rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def gathered_index(cu_seqlens: torch.Tensor | Sequence[int], cp: int) -> torch.Tensor:
    """Global position of each row of a CP all-gather (rank 0's tokens, then rank 1's, ...)."""
    return torch.cat([token_index(cu_seqlens, cp, r) for r in range(cp)])


def segment_of(positions: torch.Tensor, cu_seqlens: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Index of the ``cu_seqlens`` segment that holds each global position."""
    bounds = torch.tensor(_bounds(cu_seqlens), dtype=torch.long, device=positions.device)
    return torch.searchsorted(bounds, positions, right=True) - 1


class GatherFromContextParallel(torch.autograd.Function):
    """All-gather along dim 0 over the CP group; backward reduce-scatters the gradient.

    Every rank's queries read every rank's keys and values, so the gradient of this rank's K/V is the
    sum of what all ranks' attention sends back: a plain split (megatron's ``gather`` backward) would
    drop the other ranks' contributions.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty((size * x.size(0), *x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        out = grad.new_empty((grad.size(0) // size, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None


def gather_from_context_parallel(x: torch.Tensor, group=None) -> torch.Tensor:
    return GatherFromContextParallel.apply(x, group if group is not None else cp_group())
