"""Learner memory handoff: megatron's gradient buffers and optimizer state leave the GPU while a
colocated rollout engine generates, and come back before training.

Why: on a colocated GPU the engine's KV cache and the learner's training state compete for the same
memory. The step order is generate -> engine sleep -> ``onload`` -> train -> ``offload`` -> wake the
engine's weights -> weight sync -> wake the KV cache.

What moves:

- the DDP gradient buffers (``ddp.buffers`` and ``ddp.expert_parallel_buffers``). Their contents are
  dead after the optimizer step (every learner step zeroes them first), so ``offload`` releases their
  storage without a copy and ``onload`` gives it back zeroed, through megatron's own
  ``offload_grad_buffers`` / ``restore_grad_buffers``;
- the optimizer state: Adam's ``exp_avg``/``exp_avg_sq`` (every CUDA tensor in the inner optimizer's
  state) and the fp32 main parameters that mixed precision keeps beside bf16/fp16 weights
  (``shard_fp32_from_float16_groups`` of the distributed optimizer, ``fp32_from_float16_groups`` of
  the plain one). These are copied to pinned host buffers (allocated once, reused every step) and back.

Storage is released with ``untyped_storage().resize_(0)`` and re-grown in place, so every tensor
object and every view of it (``param.main_grad``, bucket views, ``model_param.main_param``) stays
valid; nothing is re-pointed. The model weights stay: with the distributed optimizer the param buffer
*is* the weights, which the weight sync reads right after the offload. With fp32 weights the
distributed optimizer's parameters are views of those weights, so they stay too. Save checkpoints
while the learner is onloaded.

On CPU (gloo runs) both functions are no-ops: there is no device memory to hand over. Each model logs
once which path it takes.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass
class HandoffBytes:
    """Device bytes an offload releases."""

    grads: int  # DDP gradient buffers
    optimizer: int  # optimizer state + fp32 main parameters

    @property
    def total(self) -> int:
        return self.grads + self.optimizer


@dataclass
class _Handoff:
    """Per-model state: whether it is offloaded, and the pinned copies keyed by tensor identity."""

    offloaded: bool = False
    logged: bool = False
    pinned: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


_HANDOFFS: "weakref.WeakKeyDictionary[torch.nn.Module, _Handoff]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def offload(tm) -> None:
    """Release ``tm``'s gradient buffers and move its optimizer state to pinned host memory.

    Call after the optimizer step. A second call before :func:`onload` does nothing.
    """
    state = _state(tm)
    if not _on_gpu(tm, state) or state.offloaded:
        return
    _check_grads_apart_from_weights(tm)
    torch.cuda.synchronize()  # the step's kernels (optimizer update, param all-gather) are done
    # main params' .grad: views of the grad buffers, or fp32 copies of bf16 grads (freed here)
    tm.optimizer.zero_grad(set_to_none=True)
    tm.ddp.offload_grad_buffers(synchronize=False, empty_cache=False)
    tensors = optimizer_tensors(tm)
    pinned = {}
    for t in tensors:
        held = state.pinned.get(id(t))
        host = held[1] if held is not None and held[0] is t else torch.empty(
            t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        host.copy_(t, non_blocking=True)
        pinned[id(t)] = (t, host)
    torch.cuda.synchronize()  # the host copies are complete before the device storage goes
    for t in tensors:
        t.untyped_storage().resize_(0)
    state.pinned = pinned
    state.offloaded = True
    torch.cuda.empty_cache()  # return the memory to the driver: the engine is another allocator


@torch.no_grad()
def onload(tm) -> None:
    """Bring back what :func:`offload` moved (gradient buffers zeroed). Does nothing if not offloaded."""
    state = _state(tm)
    if not _on_gpu(tm, state) or not state.offloaded:
        return
    tm.ddp.restore_grad_buffers(synchronize=False)
    for t, host in state.pinned.values():
        t.untyped_storage().resize_(host.numel() * host.element_size())
        t.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    state.offloaded = False


def is_offloaded(tm) -> bool:
    return _state(tm).offloaded


def optimizer_tensors(tm) -> list[torch.Tensor]:
    """The optimizer's device tensors that :func:`offload` moves to the host (each exactly once)."""
    found: dict[int, torch.Tensor] = {}
    for opt in getattr(tm.optimizer, "chained_optimizers", [tm.optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or getattr(opt, "is_stub_optimizer", False):
            continue  # no parameters of this kind on this rank
        mains = getattr(opt, "shard_fp32_from_float16_groups", None) or getattr(opt, "fp32_from_float16_groups", [])
        candidates = [p for group in mains for p in group if p is not None]
        candidates += [v for per_param in inner.state.values() for v in per_param.values()
                       if isinstance(v, torch.Tensor)]
        for t in candidates:
            if t.is_cuda and id(t) not in found:
                _check_owns_storage(t)
                found[id(t)] = t
    return list(found.values())


def handoff_bytes(tm) -> HandoffBytes:
    """Device bytes :func:`offload` releases (0 on CPU): the sizes of what it moves, offloaded or not."""
    buffers = tm.ddp.buffers + tm.ddp.expert_parallel_buffers
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers if b.grad_data.is_cuda)
    optimizer = sum(t.numel() * t.element_size() for t in optimizer_tensors(tm))
    return HandoffBytes(grads, optimizer)


def _check_owns_storage(t: torch.Tensor) -> None:
    """Releasing a storage frees every tensor in it: refuse one that also holds something else."""
    nbytes = t.untyped_storage().nbytes()
    if nbytes and (t.storage_offset() != 0 or t.numel() * t.element_size() != nbytes):  # 0: offloaded
        raise RuntimeError(
            f"optimizer tensor of shape {tuple(t.shape)} is a view into a larger storage "
            f"({t.untyped_storage().nbytes()} bytes); offloading it would free memory other tensors use. "
            "This optimizer layout is not supported by r1mega.train.memory.")


def _check_grads_apart_from_weights(tm) -> None:
    """megatron shares one buffer between MXFP8 params and grads: freeing the grads would free weights."""
    for b in tm.ddp.buffers + tm.ddp.expert_parallel_buffers:
        if b.param_data is not None and b.param_data.untyped_storage().data_ptr() == \
                b.grad_data.untyped_storage().data_ptr():
            raise RuntimeError("the DDP grad buffer shares its storage with the param buffer (MXFP8 params): "
                               "the learner memory handoff cannot free the grads; use another fp8_recipe")


def _state(tm) -> _Handoff:
    state = _HANDOFFS.get(tm.ddp)
    if state is None:
        state = _HANDOFFS[tm.ddp] = _Handoff()
    return state


def _on_gpu(tm, state: _Handoff) -> bool:
    first = next(tm.module.parameters(), None)
    on_gpu = first is not None and first.is_cuda
    if not state.logged:
        state.logged = True
        if on_gpu:
            size = handoff_bytes(tm)
            log.info("learner memory handoff: offload frees the grad buffers (%.1f MiB) and moves the optimizer "
                     "state (%.1f MiB now; Adam moments appear after the first step) to pinned host memory",
                     size.grads / 2**20, size.optimizer / 2**20)
        else:
            log.info("learner memory handoff: CPU run, offload/onload keep megatron's buffers in place (no-op)")
    return on_gpu
