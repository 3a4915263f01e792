"""The one place that imports megatron-core and papers over its version and CPU differences.

Call :func:`ensure_megatron` before touching ``megatron.core``. On a CUDA machine it only imports and
checks the version; on CPU it installs :mod:`r1mega.platform.cpu_emulation` first and then patches
the few megatron functions that hard-code CUDA tensors (each patch names the file it replaces).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import warnings
from importlib import metadata

import torch

from r1mega.platform import cpu_emulation
from r1mega.platform.optional import have_transformer_engine

log = logging.getLogger(__name__)

MIN_MEGATRON = (0, 16, 0)
_READY = False


def megatron_version() -> tuple[int, ...]:
    raw = metadata.version("megatron-core")
    return tuple(int(p) for p in raw.split(".")[:3] if p.isdigit())


def supports_routing_replay() -> bool:
    """megatron-core's router replay (``transformer/moe/router_replay.py``, from 0.16) is present.

    r1mega's routing replay (``models/routing_replay.py``) builds on it; older releases lack both the
    module and ``TransformerConfig.moe_enable_routing_replay``.
    """
    import importlib.util

    return importlib.util.find_spec("megatron.core.transformer.moe.router_replay") is not None


def ensure_megatron() -> None:
    """Import megatron-core ready for this machine (idempotent)."""
    global _READY
    if _READY:
        return
    try:
        version = megatron_version()
    except metadata.PackageNotFoundError as e:
        raise RuntimeError("megatron-core is not installed: run `make setup` (see README).") from e
    if version < MIN_MEGATRON:
        raise RuntimeError(
            f"megatron-core {'.'.join(map(str, version))} is too old; r1mega needs >= "
            f"{'.'.join(map(str, MIN_MEGATRON))}: `pip install -e .` pins a compatible release."
        )
    on_cpu = cpu_emulation.install()
    # megatron warns at import about missing TE/apex; r1mega reports its chosen path once itself
    # (platform.optional), so these repeat what is already logged.
    for pattern in (".*Apex is not installed.*", ".*Transformer Engine and Apex are not installed.*"):
        warnings.filterwarnings("ignore", message=pattern)
    import megatron.core  # noqa: F401  (after the emulation, by design)

    if on_cpu:
        _patch_megatron_for_cpu()
    if not have_transformer_engine():
        _patch_megatron_without_te()
    _patch_megatron_bugs()
    _READY = True


def _patch_megatron_for_cpu() -> None:
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # optimizer/clip_grads.py asserts `param.grad.type() == 'torch.cuda.FloatTensor'`.
    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            for g in grads:
                g.mul_(clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32

    # tensor_parallel/random.py reads/writes CUDA generators for the model-parallel RNG tracker.
    def _get_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.default_generator.get_state()

    def _set_rng_state(new_state, device=-1, graph_safe=False):
        torch.default_generator.set_state(new_state)

    mp_random._get_cuda_rng_state = _get_rng_state
    mp_random._set_cuda_rng_state = _set_rng_state
    # The emulated CUDA generator *is* the CPU generator, so the tracker's "CPU RNG state changed
    # within GPU RNG context" check fires on every fork; the swap itself is exact.
    logging.getLogger(mp_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage())

    # moe_utils.maybe_move_tensor_to_cpu ignores `as_numpy` for CPU tensors; the alltoall
    # dispatcher then passes tensors where split-size lists are expected.
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.detach().cpu().numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    # moe_utils.router_gating_linear references te_general_gemm, defined only when TE imports.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_megatron_without_te() -> None:
    from megatron.core.transformer import multi_latent_attention as mla

    # multi_latent_attention.py believes TE is present when megatron's TE extension module imports
    # (it does, with placeholders), then calls isinstance(x, None).
    mla.HAVE_TE = False


def _patch_megatron_bugs() -> None:
    """Fixes for megatron-core bugs that are not CPU specific (see docs/architecture.md)."""
    from r1mega.models import mla_fix

    if not os.environ.get("R1MEGA_SKIP_MLA_FIX"):  # only to demonstrate the bug in tests
        mla_fix.install()
    _fix_expert_bias_padding_mask()


def _fix_expert_bias_padding_mask() -> None:
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


def local_expert_spec() -> tuple[type, object]:
    """``(SequentialMLP class, MLPSubmodules)`` of megatron's local spec, on every supported version.

    0.16 returns the pair from ``LocalSpecProvider.grouped_mlp_modules(grouped_gemm, fp8)``; 0.19
    takes one argument and returns ``functools.partial(SequentialMLP, submodules=...)``.
    """
    from megatron.core.models.backends import LocalSpecProvider

    provider = LocalSpecProvider()
    n_args = len(inspect.signature(provider.grouped_mlp_modules).parameters)
    built = provider.grouped_mlp_modules(*([False] * n_args))
    if isinstance(built, functools.partial):
        return built.func, built.keywords["submodules"]
    return built


@functools.cache
def gpt_accepts_padding_mask() -> bool:
    """``GPTModel.forward(padding_mask=...)`` (True = padding) keeps padding tokens out of the MoE aux
    loss, z-loss and expert-bias counts (megatron-core >= 0.16); older releases lack the argument.
    Cached: asked on every packed micro-batch."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    return "padding_mask" in inspect.signature(GPTModel.forward).parameters
