"""The one place that imports megatron-core and papers over its version and CPU differences.

Call :func:`ensure_megatron` before touching ``megatron.core``. On a CUDA machine it only imports and
checks the version; on CPU it installs :mod:`r1mega.platform.cpu_emulation` first and then patches
the few megatron functions that hard-code CUDA tensors (each patch names the file it replaces).
"""

from __future__ import annotations

import logging
import warnings
from importlib import metadata

import torch

from r1mega.platform import cpu_emulation
from r1mega.platform.optional import have_transformer_engine

log = logging.getLogger(__name__)

MIN_MEGATRON = (0, 16, 1)
_READY = False


def megatron_version() -> tuple[int, ...]:
    raw = metadata.version("megatron-core")
    return tuple(int(p) for p in raw.split(".")[:3] if p.isdigit())


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
    _skip_identity_chunk_sort()
    _skip_empty_rope_pass_through()
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


def _skip_identity_chunk_sort() -> None:
    """The alltoall dispatcher's (un)sort of token chunks by local expert returns its input when the order
    is the identity (one TP x EP rank holds every expert: ``moe_utils.sort_chunks_by_idxs``).

    Why: megatron then still splits the tokens into a chunk per expert and concatenates them back in the
    same order, a copy of every routed token (and of its gradient) twice per MoE layer, behind two host
    syncs (``.tolist()``). The result is the same tensor values either way.
    """
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.sort_chunks_by_idxs
    if getattr(original, "_r1mega_identity_skip", False):
        return

    def sort_chunks_by_idxs(input, split_sizes, sorted_idxs, probs=None, fused=False):
        if not fused and sorted_idxs.device.type == "cpu":
            order = sorted_idxs.tolist()
            if order == list(range(len(order))):
                return input, probs
        return original(input, split_sizes, sorted_idxs, probs=probs, fused=fused)

    sort_chunks_by_idxs._r1mega_identity_skip = True
    moe_utils.sort_chunks_by_idxs = sort_chunks_by_idxs
    token_dispatcher.sort_chunks_by_idxs = sort_chunks_by_idxs


def _skip_empty_rope_pass_through() -> None:
    """megatron's unfused rotary embedding (``rope_utils._apply_rotary_pos_emb_bshd``) without its final
    ``torch.cat((t, t_pass))`` when the rotation covers every dim of the head (``t_pass`` empty).

    Why: that concatenation with an empty tensor is a copy of every query and key per layer, forward and
    backward. The rotation itself is megatron's, op for op, so the values are the same; partial rotary
    (GLM-4.5) and MLA's de-interleaving keep megatron's own function.

    The cosine and sine of the last table are kept (:class:`_LastRotation`): every layer rotates its queries
    and keys by the same table, so a forward computes them once instead of twice per layer (about 2% of a
    megatron-engine decode step on the demo policy). ``* mscale`` is skipped at 1.0 (the same values).
    """
    from megatron.core.models.common.embeddings import rope_utils

    original = rope_utils._apply_rotary_pos_emb_bshd
    if getattr(original, "_r1mega_no_empty_cat", False):
        return
    last = _LastRotation()

    def _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False, multi_latent_attention=False,
                                   mscale=1.0):
        if multi_latent_attention or t.shape[-1] != freqs.shape[-1]:
            return original(t, freqs, rotary_interleaved=rotary_interleaved,
                            multi_latent_attention=multi_latent_attention, mscale=mscale)
        cos_, sin_ = last.cos_sin(freqs, mscale, t.dtype)
        return (t * cos_) + (rope_utils._rotate_half(t, rotary_interleaved) * sin_)

    _apply_rotary_pos_emb_bshd._r1mega_no_empty_cat = True
    rope_utils._apply_rotary_pos_emb_bshd = _apply_rotary_pos_emb_bshd


class _LastRotation:
    """``cos(freqs) * mscale`` and ``sin(freqs) * mscale`` in a dtype, for the last rotary table asked for.

    A hit needs the same memory (storage, offset, shape, strides) at the same version counter (which a view
    shares with its base, so an in-place write to the table is a miss) and the same ``mscale`` and dtype.
    The table itself is held, so its memory cannot be freed and reused by another tensor while it is the
    key. A table with a gradient, or one being traced by ``torch.compile``, is never kept.
    """

    def __init__(self):
        self.key, self.table, self.value = None, None, None

    def cos_sin(self, freqs: torch.Tensor, mscale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if freqs.requires_grad or torch.compiler.is_compiling():
            return self._compute(freqs, mscale, dtype)
        key = (freqs.untyped_storage().data_ptr(), freqs.device, freqs.storage_offset(), freqs.shape,
               freqs.stride(), freqs.dtype, freqs._version, mscale, dtype)
        if key != self.key:
            self.key, self.table, self.value = key, freqs, self._compute(freqs, mscale, dtype)
        return self.value

    @staticmethod
    def _compute(freqs: torch.Tensor, mscale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos_, sin_ = torch.cos(freqs), torch.sin(freqs)
        if mscale != 1.0:
            cos_, sin_ = cos_ * mscale, sin_ * mscale
        return cos_.to(dtype), sin_.to(dtype)
