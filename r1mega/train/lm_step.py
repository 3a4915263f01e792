"""One next-token-prediction training step over megatron's forward/backward schedules.

Used by the parity tool, checkpoint tests and (with masks) SFT. Works for every TP/PP/EP layout:
the schedule handles pipeline send/receive; DDP + ``finalize_model_grads`` reduce gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from r1mega.models import context_parallel
from r1mega.platform.distributed import compute_device
from r1mega.train.model_setup import TrainingModel

from megatron.core import parallel_state  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402


@dataclass
class StepResult:
    loss: float  # mean LM loss over the global batch (same value on every rank)
    grad_norm: float
    skipped: bool


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked mean over the micro-batch. Under context parallelism this rank holds part of each sequence:
    its partial sum over the micro-batch's total count (all CP ranks), so the CP partials add up."""
    per_token = output_tensor.float()
    count = loss_mask.sum()
    if context_parallel.cp_size() > 1:
        count = count.clone()
        dist.all_reduce(count, group=context_parallel.cp_group())
    loss = (per_token * loss_mask).sum() / count.clamp(min=1)
    # clone: megatron divides the returned loss by the micro-batch count in place.
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    batch, loss_mask = next(data_iterator)
    device = compute_device()
    batch, loss_mask = batch.to(device, non_blocking=True), loss_mask.to(device, non_blocking=True)
    tokens = batch[:, :-1].contiguous()
    labels = batch[:, 1:].contiguous()
    positions = torch.arange(tokens.size(1), device=device).unsqueeze(0).expand_as(tokens)
    cp = context_parallel.cp_size()
    if cp > 1:  # this rank's 2 load-balanced chunks of every row
        idx = context_parallel.token_index([0, tokens.size(1)], cp, context_parallel.cp_rank()).to(device)
        tokens, labels, positions, loss_mask = (x[:, idx].contiguous() for x in (tokens, labels, positions, loss_mask))
    output = model(tokens, positions, None, labels=labels)
    return output, partial(_loss_func, loss_mask.float())


def local_batch(global_tokens: torch.Tensor) -> torch.Tensor:
    """This data-parallel rank's contiguous slice of the global batch."""
    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    if global_tokens.size(0) % dp:
        raise ValueError(f"global batch {global_tokens.size(0)} is not divisible by dp={dp}")
    return global_tokens.chunk(dp)[rank]


def lm_train_step(tm: TrainingModel, tokens: torch.Tensor, micro_batch_size: int,
                  loss_mask: torch.Tensor | None = None, force_all_reduce: bool = False,
                  forward_only: bool = False) -> StepResult:
    """Forward/backward over this rank's ``tokens`` [b, s+1] in micro-batches, then an optimizer step.

    ``loss_mask`` [b, s] selects the predicted positions that count (default: all), e.g. answers
    only. ``force_all_reduce`` all-reduces gradients even with the distributed optimizer, so every
    rank holds full gradients afterwards (parity checks read them). ``forward_only`` evaluates.
    """
    if tokens.size(0) % micro_batch_size:
        raise ValueError(f"local batch {tokens.size(0)} is not divisible by micro_batch_size={micro_batch_size}")
    if loss_mask is None:
        loss_mask = torch.ones(tokens.size(0), tokens.size(1) - 1)
    num_micro = tokens.size(0) // micro_batch_size
    micro_batches = zip(tokens.split(micro_batch_size), loss_mask.split(micro_batch_size))
    if not forward_only:
        tm.ddp.zero_grad_buffer()
        tm.optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=micro_batches,
        model=[tm.ddp],
        num_microbatches=num_micro,
        seq_length=tokens.size(1) - 1,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        force_all_reduce=force_all_reduce,
    )
    loss = _global_mean_loss(losses)
    if forward_only:
        return StepResult(loss=loss, grad_norm=0.0, skipped=False)
    success, grad_norm, _ = tm.optimizer.step()
    if success:
        tm.scheduler.step(increment=1)
    return StepResult(loss=loss, grad_norm=float(grad_norm or 0.0), skipped=not success)


def _global_mean_loss(losses: list[dict]) -> float:
    """Average over micro-batches (last stage) and DP ranks, then share with every rank."""
    value = torch.zeros(2, dtype=torch.float64, device=compute_device())  # NCCL reduces device tensors
    if parallel_state.is_pipeline_last_stage() and losses:
        value[0] = sum(float(d["lm loss"]) for d in losses)
        value[1] = len(losses) / context_parallel.cp_size()  # CP ranks hold partials of one micro-batch
    if dist.is_initialized():
        # Sum over the whole world counts each last-stage value tp times per DP replica; ratios cancel.
        dist.all_reduce(value)
    value = value.cpu()
    return float(value[0] / value[1]) if value[1] else math.nan
