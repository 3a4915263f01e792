"""Chooses the transformer-layer implementation: Transformer Engine when usable, torch otherwise.

This is the one place that decides. The local spec is megatron-core's own, with three modules swapped
for r1mega's (see ``local_layers``): a sequence-parallel-capable norm, an SDPA core attention and a
self-attention whose inference KV cache holds rotated keys.
"""

from __future__ import annotations

import dataclasses
import functools

from r1mega.models.grouped_experts import GroupedSequentialMLP
from r1mega.models.local_layers import RopedCacheSelfAttention, SDPAttention, SequenceParallelNorm
from r1mega.platform.optional import check_fp8_support, have_transformer_engine

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec  # noqa: E402
from megatron.core.transformer.attention import SelfAttention  # noqa: E402
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.moe.experts import SequentialMLP  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.torch_norm import WrappedTorchNorm  # noqa: E402

_LOCAL_REPLACEMENTS = {WrappedTorchNorm: SequenceParallelNorm, DotProductAttention: SDPAttention,
                       SelfAttention: RopedCacheSelfAttention}
# model.moe_grouped_experts: grouped-GEMM experts with SequentialMLP's parameters (local spec only).
_GROUPED_EXPERTS = {SequentialMLP: GroupedSequentialMLP}


def use_transformer_engine(precision: str, fp8_recipe: str = "delayed") -> bool:
    """TE when importable; FP8 demands it and a GPU that supports the recipe (the error says what to do)."""
    if precision == "fp8":
        check_fp8_support(fp8_recipe)
    return have_transformer_engine()


def build_block_spec(config, use_te: bool, grouped_experts: bool = False):
    """Per-layer specs for the decoder (dense and MoE layers as ``config.moe_layer_freq`` says).

    ``grouped_experts`` (local spec only) swaps megatron's ``SequentialMLP`` for grouped-GEMM experts.
    """
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                      normalization=config.normalization)
    if use_te:
        return spec
    replacements = {**_LOCAL_REPLACEMENTS, **(_GROUPED_EXPERTS if grouped_experts else {})}
    spec = _swap_modules(spec, replacements, {})
    if config.add_bias_linear and config.num_moe_experts:  # gpt-oss: megatron's in-place expert bias add
        from r1mega.models.gpt_oss.expert_bias_fix import with_owned_expert_outputs

        spec = with_owned_expert_outputs(spec)
    return spec


def build_mtp_block_spec(config, block_spec, use_te: bool):
    """megatron's multi-token-prediction block spec (``None`` on stages without MTP layers).

    Each MTP layer's transformer layer is the decoder's last layer (MoE for DeepSeek-V3); its norms
    (enorm, hnorm, the shared head's norm) get the same local replacements as the decoder's.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    spec = get_gpt_mtp_block_spec(config, block_spec, use_transformer_engine=use_te)
    if spec is None or use_te:
        return spec
    return _swap_modules(spec, _LOCAL_REPLACEMENTS, {})


def _swap_modules(node, replacements: dict, seen: dict):
    """Copy a spec tree with classes replaced; shared sub-specs stay shared.

    Spec trees hold ``ModuleSpec``s and submodule dataclasses; newer megatron-core (0.19+) also
    holds ``functools.partial(Module, submodules=...)`` builders, walked the same way.
    """
    if isinstance(node, type):
        return replacements.get(node, node)
    if id(node) in seen:
        return seen[id(node)]
    if isinstance(node, functools.partial):
        out = functools.partial(_swap_modules(node.func, replacements, seen),
                                *[_swap_modules(a, replacements, seen) for a in node.args],
                                **{k: _swap_modules(v, replacements, seen) for k, v in node.keywords.items()})
    elif isinstance(node, list):
        out = [_swap_modules(n, replacements, seen) for n in node]
    elif isinstance(node, ModuleSpec):
        out = dataclasses.replace(
            node,
            module=_swap_modules(node.module, replacements, seen),
            submodules=_swap_modules(node.submodules, replacements, seen),
        )
    elif dataclasses.is_dataclass(node):
        changes = {f.name: _swap_modules(getattr(node, f.name), replacements, seen)
                   for f in dataclasses.fields(node)}
        out = dataclasses.replace(node, **changes)
    else:
        return node
    seen[id(node)] = out
    return out
