"""torch_dist tensor records read straight into their destination tensors.

torch's ``FileSystemReader`` reads every tensor of a ``torch_dist`` checkpoint with ``torch.load`` of its
record (a small ``torch.save`` zip archive inside a ``.distcp`` file): the weights-only unpickler, written
in Python, runs once per tensor, the bytes land in a new tensor and are then copied into the destination.
For a checkpoint of a few thousand small expert tensors that is most of a conversion's read time.

:class:`DirectRecordReader` parses the record itself: the archive's central directory, and its
``data.pkl`` through a C unpickler that resolves only the names a plain tensor record holds (anything
else is refused, as ``weights_only`` does). A contiguous record of the destination's dtype and shape is
read with one ``readinto`` into the destination's memory; any other plain record (strided, narrowed,
another dtype) is read into a buffer and copied. A record this does not recognise (compressed, zip64,
storage transforms, another byte order, objects other than a plain tensor) goes through torch's own
reader, and that is logged once.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import logging
import pickle
import struct
import sys
from typing import NamedTuple

import torch
from torch.distributed.checkpoint.planner import LoadItemType

from r1mega.ckpt.errors import CheckpointError
from r1mega.platform.megatron_compat import ensure_megatron

log = logging.getLogger(__name__)

_EOCD = struct.Struct("<IHHHHIIH")  # end of central directory record
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory file header
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header
_EOCD_SIG, _CENTRAL_SIG, _LOCAL_SIG = 0x06054B50, 0x02014B50, 0x04034B50
_TAIL = 4096  # bytes read from a record's end: its central directory (a handful of entries)
_HEAD = 4096  # bytes read from its start: data.pkl (the first entry) and usually the data's header


class NotPlain(Exception):
    """A record this reader does not parse; torch's reader reads it."""


class _Storage(NamedTuple):
    key: str
    dtype: torch.dtype | None  # None: an untyped storage, numel in bytes
    numel: int


_UNTYPED = object()  # the pickled name of torch.storage.UntypedStorage


class TensorRecord(NamedTuple):
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None):
    if backward_hooks or metadata:
        raise NotPlain("a tensor with hooks or metadata")
    if storage.dtype is None:
        raise NotPlain("an untyped storage without a tensor dtype")
    return TensorRecord(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    """The form torch writes for dtypes without a legacy storage class (FP8): the storage counts bytes."""
    if storage.dtype is not None or not isinstance(dtype, torch.dtype) or storage.numel % dtype.itemsize:
        raise NotPlain("an unexpected _rebuild_tensor_v3 record")
    typed = _Storage(storage.key, dtype, storage.numel // dtype.itemsize)
    return _rebuild_tensor(typed, storage_offset, size, stride, requires_grad, backward_hooks, metadata)


def _storage_dtypes() -> dict[str, torch.dtype]:
    try:
        return {name: dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()}
    except AttributeError:  # another torch: every record goes through torch's reader (logged)
        return {}


_DTYPES = _storage_dtypes()


class _RecordUnpickler(pickle.Unpickler):
    """Resolves the names of a plain tensor record (to inert stand-ins); every other global is refused."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_tensor_v3"):
            return _rebuild_tensor_v3
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return _UNTYPED
        if module == "torch" and name in _DTYPES:  # a legacy typed storage class: its dtype
            return _DTYPES[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise NotPlain(f"global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and (isinstance(pid[1], torch.dtype) or pid[1] is _UNTYPED)):
            raise NotPlain(f"persistent id {pid!r}")
        return _Storage(str(pid[2]), None if pid[1] is _UNTYPED else pid[1], int(pid[4]))


def _read_at(f, offset: int, n: int) -> bytes:
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise NotPlain("a record shorter than its metadata says")
    return data


def _entries(f, base: int, length: int) -> dict[str, tuple[int, int]]:
    """The archive's entries: name -> (local header offset, size), from its central directory."""
    tail_len = min(length, _TAIL)
    tail = _read_at(f, base + length - tail_len, tail_len)
    at = len(tail) - _EOCD.size  # torch writes no archive comment
    if at < 0:
        raise NotPlain("no end of central directory")
    sig, _, _, _, count, cd_size, cd_offset, comment = _EOCD.unpack_from(tail, at)
    if sig != _EOCD_SIG or comment or 0xFFFFFFFF in (cd_size, cd_offset):
        raise NotPlain("zip64 or unexpected end of central directory")
    start = cd_offset - (length - tail_len)
    if start < 0:
        raise NotPlain("central directory beyond the bytes read")
    out, p = {}, start
    for _ in range(count):
        (sig, _, _, _, method, _, _, _, csize, usize, nlen, xlen, clen, _, _, _,
         local) = _CENTRAL.unpack_from(tail, p)
        if sig != _CENTRAL_SIG or method != 0 or csize != usize or 0xFFFFFFFF in (csize, local):
            raise NotPlain("a compressed or zip64 entry")
        out[tail[p + _CENTRAL.size: p + _CENTRAL.size + nlen].decode()] = (local, csize)
        p += _CENTRAL.size + nlen + xlen + clen
    return out


def _data_start(head: bytes, f, base: int, local: int) -> int:
    """Where an entry's bytes begin (its local header's padding varies)."""
    raw = head[local: local + _LOCAL.size]
    if len(raw) < _LOCAL.size:
        raw = _read_at(f, base + local, _LOCAL.size)
    sig, _, _, method, _, _, _, _, _, nlen, xlen = _LOCAL.unpack(raw)
    if sig != _LOCAL_SIG or method != 0:
        raise NotPlain("unexpected local header")
    return local + _LOCAL.size + nlen + xlen


def _entry(entries: dict, suffix: str) -> tuple[int, int]:
    found = [v for k, v in entries.items() if k.endswith(suffix) and k.count("/") == suffix.count("/")]
    if len(found) != 1:
        raise NotPlain(f"no single {suffix} entry")
    return found[0]


def _small_entry(entries: dict, suffix: str, head: bytes, f, base: int) -> bytes:
    """A small entry's bytes, from the record's first bytes when they hold it."""
    local, size = _entry(entries, suffix)
    start = _data_start(head, f, base, local)
    return head[start: start + size] if start + size <= len(head) else _read_at(f, base + start, size)


def parse_record(f, base: int, length: int) -> tuple[TensorRecord, int]:
    """The tensor a record holds and the file offset of its storage's first byte."""
    entries = _entries(f, base, length)
    head = _read_at(f, base, min(length, _HEAD))
    record = _RecordUnpickler(io.BytesIO(_small_entry(entries, "/data.pkl", head, f, base))).load()
    if not isinstance(record, TensorRecord):
        raise NotPlain("not a single tensor")
    order = _small_entry(entries, "/byteorder", head, f, base)
    if order.decode() != sys.byteorder:
        raise NotPlain(f"byte order {order!r}")
    local, size = _entry(entries, f"/data/{record.storage.key}")
    if size != record.storage.numel * record.storage.dtype.itemsize:
        raise NotPlain("storage size differs from its record")
    return record, base + _data_start(head, f, base, local)


def _is_contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expect = 1
    for s, st in zip(reversed(size), reversed(stride)):
        if s != 1 and st != expect:
            return False
        expect *= s
    return True


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def read_into(f, record: TensorRecord, data_at: int, offsets, lengths, target: torch.Tensor) -> bool:
    """Fill ``target`` with the record's tensor narrowed by ``offsets``/``lengths``; True when one
    ``readinto`` filled it (the record is contiguous, whole, and of the target's dtype and layout)."""
    dtype = record.storage.dtype
    whole = all(o == 0 for o in offsets) and tuple(lengths) == record.size
    if whole and dtype == target.dtype and target.is_contiguous() and tuple(target.shape) == record.size \
            and _is_contiguous(record.size, record.stride):
        buf = _bytes_of(target)
        f.seek(data_at + record.offset * dtype.itemsize)
        if f.readinto(buf) != len(buf):
            raise CheckpointError(f"a checkpoint record ends before its tensor's {len(buf)} bytes")
        return True
    storage = torch.empty(record.storage.numel, dtype=dtype)
    f.seek(data_at)
    if f.readinto(_bytes_of(storage)) != record.storage.numel * dtype.itemsize:
        raise CheckpointError("a checkpoint record ends before its storage's "
                              f"{record.storage.numel * dtype.itemsize} bytes")
    tensor = storage.as_strided(record.size, record.stride, record.offset)
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        tensor = tensor.narrow(dim, o, n)
    if tuple(tensor.shape) != tuple(target.shape):
        raise ValueError(f"a checkpoint record narrows to {tuple(tensor.shape)}, its destination is "
                         f"{tuple(target.shape)}")
    target.copy_(tensor)
    return False


@functools.cache
def _reader_class():
    ensure_megatron()  # megatron's CPU emulation goes in before megatron is imported
    from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
        CachedMetadataFileSystemReader,
    )

    class DirectRecordReader(CachedMetadataFileSystemReader):
        """megatron's cached-metadata reader whose tensor reads skip ``torch.load`` (see the module)."""

        stats: collections.Counter

        def read_data(self, plan, planner):
            self.stats = getattr(self, "stats", collections.Counter())
            per_file: dict[str, list] = {}
            for item in plan.items:
                per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
            stock, reasons = [], collections.Counter()
            for relative_path, items in per_file.items():
                with open(self.fs.concat_path(self.path, relative_path), "rb") as f:
                    for item in items:
                        info = self.storage_data[item.storage_index]
                        if item.type != LoadItemType.TENSOR or info.transform_descriptors:
                            stock.append(item)
                            reasons["not a plain tensor record"] += 1
                            continue
                        try:
                            record, data_at = parse_record(f, info.offset, info.length)
                        except NotPlain as e:
                            stock.append(item)
                            reasons[str(e)] += 1
                            continue
                        target = planner.resolve_tensor(item).detach()
                        direct = read_into(f, record, data_at, item.storage_offsets, item.lengths, target)
                        self.stats["direct" if direct else "copied"] += 1
                        planner.commit_tensor(item, target)
            if stock:
                self.stats["torch.load"] += len(stock)
                _log_stock_once(reasons)
                return super().read_data(dataclasses.replace(plan, items=stock), planner)
            return _done()

    return DirectRecordReader


_LOGGED: set[str] = set()


def _log_stock_once(reasons: collections.Counter) -> None:
    key = ", ".join(sorted(reasons))
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("checkpoint reads: %d tensor record(s) through torch.load (%s); the others read directly",
                 sum(reasons.values()), key)


def _done():
    from torch.futures import Future

    fut: Future = Future()
    fut.set_result(None)
    return fut


def direct_record_reader(path):
    """A ``StorageReader`` for the ``torch_dist`` checkpoint at ``path`` (see :class:`DirectRecordReader`)."""
    return _reader_class()(path)
