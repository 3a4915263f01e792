"""A fix for a megatron-core MoE router bug that is not CPU specific (see docs/architecture.md).

Packed micro-batches pass megatron a padding mask; with DeepSeek-V3's aux-loss-free expert bias the
router counts tokens per expert under that mask, and megatron applies the mask along the wrong axis.
"""

from __future__ import annotations

import inspect

import torch


def install() -> None:
    """``transformer/moe/router.py`` ``TopKRouter._apply_expert_bias`` masks the [tokens, experts] routing
    map with the flattened [tokens] padding mask, which broadcasts along the *expert* axis: an error when
    tokens != experts (any packed DeepSeek-V3 micro-batch with padding: TP, CP), silently wrong counts
    when they are equal. The mask must cover each token's row."""
    from megatron.core.transformer.moe.router import TopKRouter

    original = TopKRouter._apply_expert_bias
    if getattr(original, "_r1mega_fixed", False) or "padding_mask" not in inspect.signature(original).parameters:
        return

    def _apply_expert_bias(self, routing_map: torch.Tensor, padding_mask=None):
        if self.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():
                if padding_mask is not None:
                    routing_map = routing_map & ~padding_mask.reshape(-1, 1)
                self.local_tokens_per_expert += routing_map.sum(dim=0)

    _apply_expert_bias._r1mega_fixed = True
    TopKRouter._apply_expert_bias = _apply_expert_bias
