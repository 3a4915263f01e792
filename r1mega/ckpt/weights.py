"""Weights-only distributed checkpoints, written and read a tensor at a time (checkpoint conversion).

A converted model has no optimizer, scheduler or RNG state to keep: :func:`save_weights` writes only
the model's tensors, in megatron's ``torch_dist`` format, so the trainer loads it in any layout as
initial weights (``meta.json`` says ``"contents": "weights"``; resuming from it is refused).

Memory stays bounded on both sides:

* **Writing.** The model may be built on the meta device (shapes, names and sharding only). Every
  tensor is produced by ``resolve(name)`` at the moment :class:`~r1mega.ckpt.lean_writer.LeanWriter`
  writes it and is dropped right after, so a rank never holds more than a few of its tensors. (megatron's own writer
  stages every tensor of the rank first and copies views such as the SwiGLU gate/up halves.)
* **Reading.** :class:`WeightsReader` loads a few full (TP1/PP1/EP1) tensors at a time from a
  checkpoint saved in any layout (training or weights-only), through megatron's loader and the
  sharded state dict of a meta-device model of layout 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import threading
from pathlib import Path
from typing import Callable

import torch

from r1mega.ckpt.dist_ckpt import (
    CONTENTS_WEIGHTS,
    _layout,
    _model_names,
    _param_shapes,
    _rank,
    _world,
    atomic_save,
)
from r1mega.ckpt.errors import CheckpointError
from r1mega.ckpt.lean_writer import LeanWriter
from r1mega.ckpt.record_reader import direct_record_reader
from r1mega.ckpt.state import architecture, make_meta
from r1mega.platform.megatron_compat import ensure_megatron

log = logging.getLogger(__name__)

Resolve = Callable[[str], torch.Tensor]
# rows start:stop (dim 0) of a tensor, as a tensor of its own, or None where only the whole one is made
ResolveRows = Callable[[str, int, int], "torch.Tensor | None"]


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _Materializer:
    """Real tensors for the meta views that megatron's sharded state dict holds.

    A view (a SwiGLU half, a reshaped expert weight) shares the storage of the parameter or buffer it
    came from; the owner is produced by ``resolve(name)`` and the view's geometry applied to it. The
    last owner is kept so the two halves of one SwiGLU weight cost one ``resolve``.
    """

    def __init__(self, module: torch.nn.Module, resolve: Resolve, resolve_rows: ResolveRows | None = None):
        self.resolve = resolve
        self.resolve_rows = resolve_rows
        self.owners: dict[int, tuple[str, torch.Tensor]] = {}
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            self.owners.setdefault(_storage_key(t), (name, t))
        self._local = threading.local()  # the writer's threads each keep their own last owner
        self.resolved = 0

    def owns(self, t: torch.Tensor) -> bool:
        return _storage_key(t) in self.owners

    def __call__(self, view: torch.Tensor) -> torch.Tensor:
        owner = self.owners.get(_storage_key(view))
        if owner is None:
            raise CheckpointError(f"a {tuple(view.shape)} tensor of the model's sharded state dict belongs to "
                                  "no parameter or buffer, so it cannot be produced for a weights-only save")
        name, meta = owner
        rows = self._rows(name, meta, view)
        if rows is not None:
            return rows
        last = getattr(self._local, "last", None)
        if last is None or last[0] != name:
            real = self.resolve(name)
            if tuple(real.shape) != tuple(meta.shape) or real.dtype != meta.dtype:
                raise CheckpointError(f"{name}: produced {tuple(real.shape)} {real.dtype}, the model has "
                                      f"{tuple(meta.shape)} {meta.dtype}")
            last = self._local.last = (name, real.contiguous())
            self.resolved += 1
        real = last[1]
        offset = view.storage_offset() - meta.storage_offset()
        return real.as_strided(view.size(), view.stride(), real.storage_offset() + offset)

    def _rows(self, name: str, meta: torch.Tensor, view: torch.Tensor) -> torch.Tensor | None:
        """A view that is a block of whole rows of its owner (a SwiGLU half), from ``resolve_rows``: a
        tensor of its own, so the owner is not built whole and the writer does not copy the view out."""
        shape = tuple(view.shape)
        while len(shape) > meta.dim() and shape[0] == 1:  # megatron's prepended expert axis
            shape = shape[1:]
        if self.resolve_rows is None or not shape or len(shape) != meta.dim() or shape[1:] != tuple(meta.shape[1:]) \
                or not view.is_contiguous() or not meta.is_contiguous():
            return None
        row = math.prod(meta.shape[1:]) if meta.shape[0] else 0
        offset = view.storage_offset() - meta.storage_offset()
        if not row or offset % row:
            return None
        start = offset // row
        real = self.resolve_rows(name, start, start + shape[0])
        if real is None:
            return None
        if tuple(real.shape) != shape or real.dtype != meta.dtype:
            raise CheckpointError(f"{name} rows {start}:{start + shape[0]}: produced {tuple(real.shape)} "
                                  f"{real.dtype}, the model has {shape} {meta.dtype}")
        self.resolved += 1
        return real.view(view.shape)


def _streaming_strategy(materialize: _Materializer | None):
    """megatron's torch_dist save strategy, written item by item by :class:`LeanWriter` (torch's
    ``FileSystemWriter`` less ``torch.save`` framing)."""
    from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    class LazyPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            obj = self.lookup_object(write_item.index)
            if isinstance(obj, torch.Tensor) and materialize is not None and (obj.is_meta or materialize.owns(obj)):
                # every parameter and buffer comes from resolve (a meta model's few real buffers too)
                obj = materialize(obj)
            elif isinstance(obj, torch.Tensor) and obj.is_meta:
                raise CheckpointError("the model is on the meta device and no tensors were given to save")
            return self.transform_object(write_item, obj)

    class StreamingSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
            with _gc_paused():
                state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict,
                                                                         self.keep_only_main_replica)
                pyt_state = mcore_to_pyt_state_dict(state, False)
                planner = LazyPlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                      flatten_state_dict=False)
                # torch's DCP save less its per-key Stateful pass (none here); one process plans alone
                # (no pickled plans through the process group)
                with _without_crc32():
                    _save_state_dict(pyt_state, LeanWriter(str(checkpoint_dir)), planner=planner,
                                     no_dist=_world() == 1)

    return StreamingSave("torch_dist", 1, thread_count=1)


@contextlib.contextmanager
def _without_crc32():
    """torch.save without a CRC32 of every record (torch.load does not check it; the checkpoint's commit
    fsyncs the files): computing it is a second pass over every byte written. The lean writer's own
    records have none either; this is for the items it leaves to torch.save."""
    from torch.utils.serialization import config

    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


@contextlib.contextmanager
def _gc_paused():
    """No cyclic garbage collection in a block that allocates DCP's many small objects (write items, chunk
    and storage metadata for every tensor): its collections would rescan the model's objects again and
    again, about a tenth of a conversion's CPU time. Reference counting still frees every tensor."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def save_weights(module: torch.nn.Module, config, root: str | Path, *, step: int = 0, model_cfg=None,
                 resolve: Resolve | None = None, resolve_rows: ResolveRows | None = None,
                 keep_last: int | None = None) -> Path:
    """Write ``<root>/step_<step>`` with the model's tensors only, atomically (collective).

    ``module`` is this rank's model chunk; on the meta device ``resolve(name)`` must return each
    parameter / buffer (this rank's shard, the module's shape and dtype) when it is written, and
    ``resolve_rows(name, start, stop)`` may return a block of its rows alone (the SwiGLU halves that
    megatron saves as separate tensors).
    """
    ensure_megatron()
    from megatron.core import dist_checkpointing

    materialize = _Materializer(module, resolve, resolve_rows) if resolve is not None else None

    def write(tmp: Path) -> dict | None:
        state = {"model": module.sharded_state_dict(), "r1mega": {"step": int(step), "extra": {}}}
        layout = _layout(None, config)
        shapes = _param_shapes(module, config)
        dist_checkpointing.save(state, str(tmp), sharded_strategy=_streaming_strategy(materialize))
        if materialize is not None:
            log.debug("weights-only save: %d tensors produced on demand", materialize.resolved)
        if _rank() != 0:
            return None
        return make_meta(step, layout, architecture(config), shapes, _model_names(None, model_cfg), None, {},
                         contents=CONTENTS_WEIGHTS)

    return atomic_save(root, step, write, keep_last=keep_last)


class WeightsReader:
    """Full (single-process) model tensors from a checkpoint of any layout, a few at a time.

    ``module`` is a layout-1 model on the meta device: its sharded state dict says where each
    tensor lives in the checkpoint. :meth:`read` allocates only the tensors asked for.
    """

    def __init__(self, step_dir: str | Path, module: torch.nn.Module):
        ensure_megatron()
        from megatron.core.dist_checkpointing.validation import verify_checkpoint_and_load_strategy

        self.step_dir = Path(step_dir)
        verify_checkpoint_and_load_strategy(str(self.step_dir))  # a torch_dist checkpoint, checked once
        self.template = module.sharded_state_dict()
        self.meta = dict(module.named_parameters())
        self.meta.update(module.named_buffers())
        # the checkpoint's metadata is read once for every read, not once per call; tensor records are
        # read straight into the requested tensors
        self.storage = direct_record_reader(self.step_dir)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        with _gc_paused():
            return self._read(names)

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
        from megatron.core.dist_checkpointing.strategies.torch import (
            MCoreLoadPlanner,
            _replace_state_dict_keys_with_sharded_keys,
            mcore_to_pyt_state_dict,
        )

        out, request = {}, {}
        for name in names:
            if name not in self.template:
                raise CheckpointError(f"{name} is not a tensor of the model's sharded state dict")
            shell = self.meta[name]
            out[name] = torch.empty(shell.shape, dtype=shell.dtype)
            request[name] = dataclasses.replace(self.template[name], data=out[name])
        # The loader fills the tensors in place (factories such as the SwiGLU halves are views of them).
        # Some experts of a stacked expert tensor are a partial request, which megatron's pre-0.14 layout
        # of expert tensors (prepended axes) cannot express on one process: give them the plain layout.
        apply_factories(request)
        for key, value in list(request.items()):
            request[key] = _without_prepended_axes(value, ShardedTensor)
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(request)
        tensors = [v for v in nested_values(by_key) if isinstance(v, ShardedTensor)]
        assert all(v.prepend_axis_num == 0 for v in tensors)
        # torch's DCP load on this process alone (megatron's load would re-read the metadata and the common
        # state, and plan through collectives, on every call); a subset of the checkpoint is read, each
        # tensor's global shape checked against the checkpoint's
        _load_state_dict(mcore_to_pyt_state_dict(by_key, True), self.storage, no_dist=True,
                         planner=MCoreLoadPlanner(shapes_validation_sharded_tensors=tensors))
        return out


def _without_prepended_axes(value, sharded_tensor_cls):
    """The same chunk of the same global tensor, its prepended axes made part of the local shape."""
    if isinstance(value, list):
        return [_without_prepended_axes(v, sharded_tensor_cls) for v in value]
    if not isinstance(value, sharded_tensor_cls) or not value.prepend_axis_num:
        return value
    ones = (1,) * value.prepend_axis_num
    return dataclasses.replace(value, data=value.data.view(ones + tuple(value.local_shape)),
                               local_shape=ones + tuple(value.local_shape), prepend_axis_num=0)
