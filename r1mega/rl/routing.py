"""Routing replay modes and routing-table helpers (pure torch; the megatron side is ``models/routing_replay``).

``rl.routing_replay``:

- ``none``: the learner routes every forward itself.
- ``r2``: the old-logprob pass records the learner's own choices; the training forward replays them
  (the update sees the routing of the policy that is being corrected, not of the moving one).
- ``r3``: the engine's choices (``Generation.routed_experts``) are replayed in the old-logprob pass and
  the training forward, so the learner scores each token with the experts that sampled it.

A routing table is ``[B, S-1, L_moe, k]`` integer expert ids at *input* positions (position ``t`` =
the token ``tokens[:, t]`` fed to the model, which predicts ``tokens[:, t + 1]``: the same positions as
every other per-token field of a ``LearnerBatch``). Positions without a recorded choice (padding)
hold ``0..k-1``: replay needs some valid, distinct ids there, and the loss never sees them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

ROUTING_REPLAY_MODES = ("none", "r2", "r3")


def padding_choice(topk: int) -> Tensor:
    return torch.arange(topk, dtype=torch.int16)


def routing_table(per_sample: Sequence[Optional[Tensor]], width: int) -> Tensor:
    """Stack per-sample engine choices ``[n_i, L, k]`` (input positions ``0..n_i-1``) into ``[B, width, L, k]``."""
    first = next((t for t in per_sample if t is not None), None)
    if first is None:
        raise ValueError("no sample carries routed experts: build the engine with return_routed_experts=True")
    L, k = first.shape[1:]
    out = padding_choice(k).expand(len(per_sample), width, L, k).clone()
    for i, t in enumerate(per_sample):
        if t is None:
            raise ValueError(f"sample {i} has no routed experts while others do")
        if t.shape[1:] != (L, k) or t.shape[0] > width:
            raise ValueError(f"sample {i}: routed experts of shape {tuple(t.shape)} do not fit [{width}, {L}, {k}]")
        out[i, : t.shape[0]] = t.to(torch.int16)
    return out


def differing_layers(own: Tensor, other: Tensor) -> Tensor:
    """``[..., L]`` bool: the top-k *sets* differ (order within the k choices does not matter)."""
    return (own.long().sort(-1).values != other.long().sort(-1).values).any(-1)


def routing_mismatch_metrics(differs: Tensor, mask: Tensor, num_layers: int) -> dict[str, float]:
    """From ``differs`` ``[B, S-1]`` (MoE layers whose choice differs, per position) over ``mask`` positions.

    ``routing/mismatch_token_frac``: share of positions where at least one layer differs;
    ``routing/mismatch_layer_frac``: share of (position, layer) pairs that differ.
    """
    m = mask > 0
    n = int(m.sum())
    if n == 0:
        return {"routing/mismatch_token_frac": 0.0, "routing/mismatch_layer_frac": 0.0}
    d = differs[m].double()
    return {"routing/mismatch_token_frac": float((d > 0).sum()) / n,
            "routing/mismatch_layer_frac": float(d.sum()) / (n * max(num_layers, 1))}
