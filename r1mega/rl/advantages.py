"""Sequence-level advantage estimators, picked by name, plus DAPO's filter of uninformative groups.

Every estimator maps ``(rewards[N], group_ids[N])`` to advantages ``[N]``; samples sharing a group id
answered the same prompt. Broadcasting to tokens (``adv[:, None] * mask``) is the caller's job.
Groups of one sample and groups whose rewards are all equal get exactly 0 (never NaN): they carry
no learning signal relative to their group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from r1mega.rl.registry import Registry

AdvantageFn = Callable[..., Tensor]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")
REFILL_POLICIES = ("resample", "duplicate", "none")


def register_advantage(*names: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """``@register_advantage("name")``: fn(rewards, group_ids, *, norm_by_std, eps) -> advantages."""
    return ADVANTAGES.register(*names)


def compute_advantages(name: str, rewards: Tensor, group_ids: Tensor, **cfg) -> Tensor:
    """Advantages ``[N]`` from estimator ``name``; ``cfg`` are its keywords (``norm_by_std``, ``eps``)."""
    rewards, group_ids = _check(rewards, group_ids)
    return ADVANTAGES.get(name)(rewards, group_ids, **cfg)


# --------------------------------------------------------------------------- group statistics


class _Groups(NamedTuple):
    inverse: Tensor  # [N] dense group index of each sample
    counts: Tensor  # [G] samples per group (float, rewards' dtype)
    num: int


def _check(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must both be [N]; got {tuple(rewards.shape)} and "
                         f"{tuple(group_ids.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    return rewards, group_ids.long()


def _groups(group_ids: Tensor, dtype: torch.dtype) -> _Groups:
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    counts = torch.bincount(inverse, minlength=uniq.numel()).to(dtype)
    return _Groups(inverse, counts, uniq.numel())


def _group_sum(x: Tensor, g: _Groups) -> Tensor:
    return torch.zeros(g.num, dtype=x.dtype, device=x.device).index_add_(0, g.inverse, x)


def _group_uniform(rewards: Tensor, g: _Groups, atol: float = 0.0) -> Tensor:
    """[G] bool: max - min of the group's rewards <= atol (a group of one is uniform)."""
    empty = torch.empty(g.num, dtype=rewards.dtype, device=rewards.device)
    hi = empty.scatter_reduce(0, g.inverse, rewards, "amax", include_self=False)
    lo = empty.scatter_reduce(0, g.inverse, rewards, "amin", include_self=False)
    return (hi - lo) <= atol


def uniform_groups(rewards: Tensor, group_ids: Tensor, atol: float = 0.0) -> Tensor:
    """[N] bool: the sample's group has all-equal rewards (DAPO's zero-gradient groups)."""
    rewards, group_ids = _check(rewards, group_ids)
    g = _groups(group_ids, rewards.dtype)
    return _group_uniform(rewards, g, atol)[g.inverse]


def _zero_uninformative(adv: Tensor, rewards: Tensor, g: _Groups) -> Tensor:
    """Exact 0 for singleton / all-equal groups (float rounding of the mean would leave ~1e-17)."""
    dead = _group_uniform(rewards, g)[g.inverse]
    return torch.where(dead, torch.zeros_like(adv), adv)


# --------------------------------------------------------------------------- estimators


@register_advantage("grpo")
def grpo_advantages(rewards: Tensor, group_ids: Tensor, *, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO (Shao et al. 2024): (r - mean_g) / (std_g + eps); ``norm_by_std=False`` is Dr.GRPO.

    std is *unbiased* (Bessel, n-1), as verl's ``compute_grpo_outcome_advantage`` (torch.std).
    """
    g = _groups(group_ids, rewards.dtype)
    mean = _group_sum(rewards, g) / g.counts
    centred = rewards - mean[g.inverse]
    if norm_by_std:
        var = _group_sum(centred * centred, g) / (g.counts - 1).clamp(min=1)
        centred = centred / (var.sqrt()[g.inverse] + eps)
    return _zero_uninformative(centred, rewards, g)


@register_advantage("drgrpo")
def drgrpo_advantages(rewards: Tensor, group_ids: Tensor, *, norm_by_std: bool = False, eps: float = 1e-6) -> Tensor:
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): r - mean_g, never std-scaled."""
    del norm_by_std  # the point of Dr.GRPO is to drop the std; accepted so one cfg fits all estimators
    return grpo_advantages(rewards, group_ids, norm_by_std=False, eps=eps)


@register_advantage("rloo")
def rloo_advantages(rewards: Tensor, group_ids: Tensor, *, norm_by_std: bool = False, eps: float = 1e-6) -> Tensor:
    """RLOO (Ahmadian et al. 2024): r - mean of the *other* samples = (n r - sum_g) / (n - 1), as verl.

    Not std-scaled (``norm_by_std`` is ignored).
    """
    del norm_by_std, eps
    g = _groups(group_ids, rewards.dtype)
    n = g.counts[g.inverse]
    adv = (n * rewards - _group_sum(rewards, g)[g.inverse]) / (n - 1).clamp(min=1)
    return _zero_uninformative(adv, rewards, g)


def _whiten(x: Tensor, eps: float, norm_by_std: bool = True) -> Tensor:
    """(x - mean) / (std + eps) over the whole batch, unbiased std; exact 0 when the batch has no spread."""
    if x.numel() < 2:
        return torch.zeros_like(x)
    out = x - x.mean()
    if norm_by_std:
        out = out / (x.std(unbiased=True) + eps)
    return torch.where(x.max() == x.min(), torch.zeros_like(out), out)


@register_advantage("reinforce_pp")
def reinforce_pp_advantages(rewards: Tensor, group_ids: Tensor, *, norm_by_std: bool = True,
                            eps: float = 1e-6) -> Tensor:
    """REINFORCE++ (Hu 2025): global-batch whitening of the outcome reward; no per-prompt baseline.

    Group ids are ignored: the baseline is the batch. Whitening is per *sequence* (verl whitens per
    token, i.e. length-weighted); unbiased std like ``grpo``. ``norm_by_std=False``: centring only.
    """
    del group_ids
    return _whiten(rewards, eps, norm_by_std)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(rewards: Tensor, group_ids: Tensor, *, norm_by_std: bool = True,
                                     eps: float = 1e-6) -> Tensor:
    """REINFORCE++-baseline (Hu 2025, v2): subtract the group mean, then whiten over the batch.

    Uninformative groups stay exactly 0 but their zeros do count in the batch mean/std.
    """
    centred = grpo_advantages(rewards, group_ids, norm_by_std=False)
    return _zero_uninformative(_whiten(centred, eps, norm_by_std), rewards, _groups(group_ids, rewards.dtype))


# --------------------------------------------------------------------------- DAPO dynamic sampling


@dataclass
class GroupSelectionStats:
    """What ``select_informative_groups`` did; counts are in groups (prompts)."""

    num_candidate_groups: int
    num_informative_groups: int
    num_kept_groups: int  # distinct informative groups taken from the pool
    num_duplicated_groups: int  # extra copies added by refill="duplicate"
    num_missing_groups: int  # still short of the target (refill="resample": generate this many more)
    num_excess_groups: int  # informative groups beyond the target, dropped
    group_ids: Tensor  # [len(indices)] dense ids 0..k-1 of the selected groups; copies get new ids


class GroupSelection(NamedTuple):
    indices: Tensor  # [M] long, into the candidate pool, group by group
    stats: GroupSelectionStats


def select_informative_groups(rewards: Tensor, group_ids: Tensor, num_groups: int, refill: str = "resample",
                              atol: float = 0.0) -> GroupSelection:
    """DAPO dynamic sampling (Yu et al. 2025): keep groups whose rewards differ, up to ``num_groups``.

    Groups are taken in ascending group-id order. When fewer than ``num_groups`` are informative:
    ``"resample"`` returns what it has and ``stats.num_missing_groups`` (the caller generates that
    many more prompts and calls again on the grown pool, as DAPO does); ``"duplicate"`` repeats
    kept groups cyclically; ``"none"`` trains on fewer groups. Compute advantages on the pool
    *before* selecting (group-local estimators give the same values), or use ``stats.group_ids``.
    """
    if refill not in REFILL_POLICIES:
        raise ValueError(f"unknown refill policy {refill!r}: choose one of {REFILL_POLICIES}")
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    rewards, group_ids = _check(rewards, group_ids)
    g = _groups(group_ids, rewards.dtype)
    informative = (~_group_uniform(rewards, g, atol)).nonzero().flatten().tolist()
    kept = informative[:num_groups]
    chosen = list(kept)
    if refill == "duplicate" and kept:
        chosen += [kept[i % len(kept)] for i in range(num_groups - len(kept))]
    order = torch.argsort(g.inverse, stable=True)
    counts = g.counts.long()
    starts = torch.cumsum(counts, 0) - counts
    pieces = [order[starts[c]: starts[c] + counts[c]] for c in chosen]
    indices = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long, device=rewards.device)
    sizes = counts[torch.tensor(chosen, dtype=torch.long, device=counts.device)] if chosen else counts[:0]
    new_ids = torch.repeat_interleave(torch.arange(len(chosen), device=counts.device), sizes)
    stats = GroupSelectionStats(
        num_candidate_groups=g.num,
        num_informative_groups=len(informative),
        num_kept_groups=len(kept),
        num_duplicated_groups=len(chosen) - len(kept),
        num_missing_groups=num_groups - len(chosen),
        num_excess_groups=len(informative) - len(kept),
        group_ids=new_ids,
    )
    return GroupSelection(indices, stats)
