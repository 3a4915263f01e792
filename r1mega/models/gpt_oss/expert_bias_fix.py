"""Two fixes for megatron-core's biased experts (gpt-oss; neither is CPU specific).

``transformer/mlp.py`` ``MLP.forward`` adds an expert's ``linear_fc2`` bias in place,
``output += output_bias * per_token_scale``, to the output of ``RowParallelLinear``. With expert tensor
parallelism 1 (the only size megatron allows for biased experts) that output is the matmul result handed
through ``_ReduceFromModelParallelRegion`` as is, and autograd forbids modifying a custom Function's
pass-through output in place: every training step fails ("Output 0 of _ReduceFromModelParallelRegion is a
view and is being modified inplace"). Inference (no grad) is unaffected. The experts' ``linear_fc2`` here
returns a tensor of its own while grad is enabled (one copy of the expert's output rows).

``tensor_parallel/layers.py`` ``RowParallelLinear`` tags its bias ``sequence_parallel`` whenever the model
uses sequence parallelism, experts included, so ``finalize_model_grads`` sums the expert ``linear_fc2``
bias gradients over the TP group: with TP2 x EP2 that adds *another expert's* bias gradient (the two TP
ranks hold different experts), 145% off one process's gradients in the TP2 x EP2 GRPO check. An expert sees
whole dispatched tokens, not a sequence shard: its bias gradient is complete, so the tag is removed.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron.core.tensor_parallel.layers import RowParallelLinear  # noqa: E402
from megatron.core.transformer.moe.experts import SequentialMLP  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402


class ExpertRowParallelLinear(RowParallelLinear):
    """An expert's ``RowParallelLinear``: output modifiable in place under autograd, bias gradient not summed
    over TP (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.bias is not None:
            self.bias.sequence_parallel = False

    def forward(self, input_):
        output, bias = super().forward(input_)
        if bias is not None and torch.is_grad_enabled():
            output = output.clone()
        return output, bias


def with_owned_expert_outputs(node):
    """A copy of a layer spec tree whose ``SequentialMLP`` experts use :class:`ExpertRowParallelLinear`."""
    if isinstance(node, list):
        return [with_owned_expert_outputs(n) for n in node]
    if isinstance(node, ModuleSpec):
        if isinstance(node.module, type) and issubclass(node.module, SequentialMLP) and node.submodules is not None:
            return dataclasses.replace(node, submodules=dataclasses.replace(node.submodules,
                                                                             linear_fc2=ExpertRowParallelLinear))
        return dataclasses.replace(node, submodules=with_owned_expert_outputs(node.submodules))
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return dataclasses.replace(node, **{f.name: with_owned_expert_outputs(getattr(node, f.name))
                                            for f in dataclasses.fields(node)})
    return node
