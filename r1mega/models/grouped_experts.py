"""Grouped-GEMM MoE experts without Transformer Engine: ``torch._grouped_mm`` over the local experts.

``GroupedSequentialMLP`` is megatron's ``SequentialMLP`` with a different ``forward``: the same
submodules (``local_experts.{i}.linear_fc1/linear_fc2``), so parameter names, tensor-parallel
attributes, ``sharded_state_dict`` (dist checkpoints), ``models/sharding.py`` and the HF bridge see
exactly what they see with ``SequentialMLP``. At each forward the local experts' weights are stacked
(``torch.stack``, one copy of this rank's expert weights per MoE layer, freed after backward) and the
expert MLP runs as two grouped GEMMs over the token groups instead of a Python loop over experts:

    fc1 = grouped_mm(x [T, h], W1^T [E, h, 2f], offs)      # gate | up halves, as linear_fc1 holds them
    act = silu(gate) * up * probs                          # probs applied after the activation (megatron)
    out = grouped_mm(act [T, f], W2^T [E, f, h], offs)

Interface: ``forward(permuted_local_hidden_states [T, h], tokens_per_expert [E], permuted_probs [T])
-> (output [T, h], None)``, tokens sorted by local expert (megatron's token dispatchers do that).
On CPU (float32) values and gradients are bit-identical to the loop, empty experts included.
Expert tensor parallelism works unchanged: each rank stacks its own shards, and the partial sums of
``linear_fc2`` are reduced by the token dispatcher as for ``SequentialMLP``.

Falls back to ``SequentialMLP.forward`` (logged once) where grouped GEMM does not apply: FP8/FP4
(quantisation padding), biases on the expert linears, or row strides that are not multiples of 16 bytes
(``torch._grouped_mm`` requires it: e.g. float32 with a hidden or expert size not divisible by 4).
"""

from __future__ import annotations

import logging

import torch

from megatron.core.transformer.moe.experts import SequentialMLP  # noqa: E402

log = logging.getLogger(__name__)

_ALIGN_BYTES = 16


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense (grouped_mm rejects expanded grads)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_linear(x: torch.Tensor, weights: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``x[rows of group g] @ weights[g].T`` for every group; ``offs``: int32 cumulative row counts. Without a
    gradient to flow back (the rollout engine's ``no_grad`` forwards) the output is returned as it is."""
    out = torch._grouped_mm(x, weights.transpose(1, 2), offs=offs)
    return _DenseGrad.apply(out) if out.requires_grad else out


class GroupedSequentialMLP(SequentialMLP):
    """``SequentialMLP`` parameters, grouped-GEMM forward (see the module docstring)."""

    _warned: set[str] = set()

    def _fallback_reason(self, hidden: torch.Tensor) -> str | None:
        cfg = self.config
        if getattr(cfg, "fp8", None) or getattr(cfg, "fp4", None):
            return "fp8/fp4 needs per-expert quantisation padding"
        e0 = self.local_experts[0]
        if getattr(e0.linear_fc1, "bias", None) is not None or getattr(e0.linear_fc2, "bias", None) is not None:
            return "expert linear layers have biases"
        elem = hidden.element_size()
        dims = (hidden.shape[-1], e0.linear_fc1.weight.shape[0], e0.linear_fc2.weight.shape[1])
        if any((d * elem) % _ALIGN_BYTES for d in dims):
            return f"row sizes {dims} x {elem} bytes are not multiples of {_ALIGN_BYTES} bytes"
        return None

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        reason = self._fallback_reason(permuted_local_hidden_states)
        if reason is not None:
            if reason not in self._warned:
                self._warned.add(reason)
                log.warning("grouped experts: %s; using the per-expert loop (SequentialMLP)", reason)
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)

        cfg = self.config
        hidden = permuted_local_hidden_states
        if cfg.moe_apply_probs_on_input:
            assert cfg.moe_router_topk == 1, "`moe_apply_probs_on_input` only works with `moe_router_topk`=1."
            hidden = (permuted_probs.unsqueeze(-1) * hidden).to(hidden.dtype)
            permuted_probs = torch.ones_like(permuted_probs)

        counts = torch.as_tensor(tokens_per_expert, device=hidden.device)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        w1 = torch.stack([e.linear_fc1.weight for e in self.local_experts])  # [E, 2f or f, h]
        w2 = torch.stack([e.linear_fc2.weight for e in self.local_experts])  # [E, h, f]

        fc1 = grouped_linear(hidden, w1, offs)
        if cfg.gated_linear_unit:
            x_glu, x_linear = torch.chunk(fc1, 2, dim=-1)
            if (clamp := getattr(cfg, "activation_func_clamp_value", None)) is not None:
                x_glu = x_glu.clamp(min=None, max=clamp)
                x_linear = x_linear.clamp(min=-clamp, max=clamp)
            act = cfg.activation_func(x_glu) * (x_linear + getattr(cfg, "glu_linear_offset", 0.0))
        else:
            act = cfg.activation_func(fc1)
        act = (act * permuted_probs.unsqueeze(-1)).to(act.dtype)
        return grouped_linear(act, w2, offs), None


def expert_path(model: torch.nn.Module) -> str:
    """Which expert implementation a built model uses: ``grouped`` (this module), ``sequential``, ...."""
    for module in model.modules():
        if isinstance(module, GroupedSequentialMLP):
            return "grouped (torch._grouped_mm, GroupedSequentialMLP)"
        if isinstance(module, SequentialMLP):
            return "sequential (per-expert loop, SequentialMLP)"
        if type(module).__name__ in ("TEGroupedMLP", "GroupedMLP"):
            return f"megatron {type(module).__name__}"
    return "none (dense model)"
