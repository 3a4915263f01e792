"""Moving a policy between recipe stages: weights come from a checkpoint, optimizer and schedule start fresh.

DeepSeek-R1 starts every stage from the previous stage's weights with a new optimizer. A stage here
builds a fresh ``TrainingModel`` (its own LR schedule over its own steps) and loads only the model
tensors of the previous stage's final checkpoint.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def load_weights(tm, checkpoint, model_cfg=None) -> dict:
    """Load only the model weights of ``checkpoint`` (root or ``step_*`` dir) into ``tm`` (collective).

    ``load_checkpoint`` also restores the saved LR-scheduler state; this stage's own schedule (lr,
    warmup, decay over this stage's steps) is put back afterwards.
    """
    from r1mega.ckpt import load_checkpoint

    sched = tm.scheduler.state_dict()
    info = load_checkpoint(tm, checkpoint, model_cfg=model_cfg, load_optimizer=False, load_rng=False)
    tm.scheduler.num_steps = 0
    tm.scheduler.load_state_dict(sched)
    return info


@torch.no_grad()
def weights_fingerprint(tm) -> float:
    """Sum of squares of every parameter element, summed over ranks (collective).

    Identical weights in the same layout give the same number; used to show (and test) that a stage
    starts from the previous stage's final weights, not from a fresh init.
    """
    total = torch.zeros((), dtype=torch.float64)
    for p in tm.module.parameters():
        total += p.detach().double().pow(2).sum().cpu()
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total)
