"""A DCP ``FileSystemWriter`` whose tensor records are written without ``torch.save`` (weights-only saves).

torch's writer frames every tensor of a ``torch_dist`` checkpoint with ``torch.save``: a small zip archive
per tensor (``data.pkl``, a few tiny entries, the storage bytes, a central directory), written through
the C++ zip writer in many small writes, after the tensor is pickled by a Python subclass of the pickler.
For a checkpoint of a few thousand expert tensors that framing costs about as much CPU as the bytes.

:class:`LeanWriter` writes the same archive itself: the entries torch writes, in its order, with its
64-byte data alignment (``FB`` padding), zero CRC32 (as torch with ``compute_crc32`` off), zip64 end
records and the process's serialization id. The header bytes of a tensor's archive are cached by dtype,
shape and stride; the tensor's bytes go to the file once, from its own memory, in one ``writev`` with
the header and the trailer. DCP's planning, ``WriteResult`` and ``.metadata`` are torch's, so the
checkpoint is a standard one that torch's reader, megatron's loader and
:mod:`r1mega.ckpt.record_reader` read.

Whether this process's torch writes exactly these bytes is checked once, against ``torch.save`` of a
few small tensors; if not, every tensor goes through torch's own ``torch.save`` path (logged once).
Tensors the lean path does not frame (non-contiguous, conjugate or negated views, dtypes without a
legacy storage class, tensors near the 4 GiB zip64 limit) go through torch's path, logged once with the
reason. Objects (megatron's ``ShardedObject`` items) are serialized by the planner already; their bytes
are written as torch's writer writes them.
"""

from __future__ import annotations

import collections
import functools
import io
import logging
import os
import pickle
import struct
import sys

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from r1mega.ckpt.record_reader import (
    _CENTRAL,
    _CENTRAL_SIG,
    _EOCD,
    _EOCD_SIG,
    _LOCAL,
    _LOCAL_SIG,
    NotPlain,
    _bytes_of,
    _entries,
    _small_entry,
)

log = logging.getLogger(__name__)

_DESCRIPTOR = struct.Struct("<IIII")  # data descriptor: signature, CRC32, sizes (32-bit)
_EOCD64 = struct.Struct("<IQHHIIQQQQ")  # zip64 end of central directory record
_LOCATOR64 = struct.Struct("<IIQI")  # zip64 end of central directory locator
_FLAGS = 0x0808  # sizes in a data descriptor, UTF-8 names
_EMPTY_FLAGS = 0x0800  # an empty entry: no data descriptor
_ARCHIVE = b"archive/"  # the archive name torch.save gives a stream without a file name
_LIMIT = 0xFFFFFFFF - (1 << 16)  # entries and offsets stay 32-bit below this (no zip64 extra fields)


def _local(cursor: int, name: bytes, alignment: int, flags: int = _FLAGS) -> bytes:
    """An entry's local header at ``cursor``; its extra field (``FB``, its length, then ``Z``) pads the
    entry's bytes to the next aligned offset."""
    return _aligned_local(cursor % alignment, name, alignment, flags)


@functools.lru_cache(maxsize=1024)
def _aligned_local(phase: int, name: bytes, alignment: int, flags: int) -> bytes:
    pad = -(phase + _LOCAL.size + len(name) + 4) % alignment
    extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return _LOCAL.pack(_LOCAL_SIG, 0, flags, 0, 0, 0, 0, 0, 0, len(name), len(extra)) + name + extra


class _Framer:
    """The bytes of a ``torch.save`` archive of one tensor, less the tensor's storage bytes."""

    def __init__(self, serialization_id: bytes):
        self.alignment = torch.serialization._get_storage_alignment()
        self.protocol = torch.serialization.DEFAULT_PROTOCOL
        self.small = [(b"data.pkl", None), (b".format_version", b"1"),
                      (b".storage_alignment", str(self.alignment).encode()),
                      (b"byteorder", sys.byteorder.encode())]
        self.tail = [(b"version", b"3\n"), (b".data/serialization_id", serialization_id)]
        self.storage_types = {dtype: getattr(torch, name)
                              for dtype, name in torch.storage._dtype_to_storage_type_map().items()}
        self._heads: dict[tuple, tuple[bytes, list[tuple]]] = {}

    def frames(self, t: torch.Tensor) -> tuple[bytes, bytes]:
        """(header, trailer) of the archive of ``t`` (contiguous, a storage type of its dtype)."""
        key = (t.dtype, tuple(t.shape), t.stride())
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = self._head(t)
        header, entries = head
        nbytes = t.nbytes
        entries = [*entries[:-1], (*entries[-1][:2], nbytes, _FLAGS if nbytes else _EMPTY_FLAGS)]
        parts = [_DESCRIPTOR.pack(0x08074B50, 0, nbytes, nbytes)] if nbytes else []
        cursor = len(header) + nbytes + (_DESCRIPTOR.size if nbytes else 0)
        for name, data in self.tail:
            cursor = self._entry(parts, entries, cursor, name, data)
        cd_start = cursor
        for name, offset, size, flags in entries:
            parts += [_CENTRAL.pack(_CENTRAL_SIG, 0, 0, flags, 0, 0, 0, 0, size, size, len(name), 0, 0, 0, 0, 0,
                                    offset), name]
            cursor += _CENTRAL.size + len(name)
        n, cd_size = len(entries), cursor - cd_start
        parts += [_EOCD64.pack(0x06064B50, _EOCD64.size - 12, 0x031E, 45, 0, 0, n, n, cd_size, cd_start),
                  _LOCATOR64.pack(0x07064B50, 0, cursor, 1),
                  _EOCD.pack(_EOCD_SIG, 0, 0, n, n, cd_size, cd_start, 0)]
        return header, b"".join(parts)

    def _entry(self, parts: list, entries: list, cursor: int, name: bytes, data: bytes) -> int:
        """Append a whole small entry (header, bytes, descriptor); the cursor after it."""
        name = _ARCHIVE + name
        local = _local(cursor, name, self.alignment)
        parts += [local, data, _DESCRIPTOR.pack(0x08074B50, 0, len(data), len(data))]
        entries.append((name, cursor, len(data), _FLAGS))
        return cursor + len(local) + len(data) + _DESCRIPTOR.size

    def _head(self, t: torch.Tensor) -> tuple[bytes, list[tuple]]:
        """Every byte before the storage's, and the entries' (name, local header offset, size, flags); the
        last entry is the storage's (name and offset only)."""
        parts: list = []
        entries: list = []
        cursor = 0
        for name, data in self.small:
            cursor = self._entry(parts, entries, cursor, name, self._pickle(t) if data is None else data)
        name = _ARCHIVE + b"data/0"
        parts.append(_local(cursor, name, self.alignment, _FLAGS if t.nbytes else _EMPTY_FLAGS))
        entries.append((name, cursor))
        return b"".join(parts), entries

    def _pickle(self, t: torch.Tensor) -> bytes:
        """``data.pkl`` as torch.save pickles a tensor whose storage is exactly its bytes."""
        pid = ("storage", self.storage_types[t.dtype], "0", "cpu", t.numel())
        buf = io.BytesIO()
        _TensorPickler(buf, protocol=self.protocol).dump(
            _Rebuild((_PersistentId(pid), 0, tuple(t.shape), t.stride(), False, collections.OrderedDict())))
        return buf.getvalue()


class _PersistentId:
    __slots__ = ("pid",)

    def __init__(self, pid: tuple):
        self.pid = pid


class _Rebuild:
    __slots__ = ("args",)

    def __init__(self, args: tuple):
        self.args = args

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _TensorPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if type(obj) is _PersistentId else None


def _torch_save_bytes(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def _serialization_id(archive: bytes) -> bytes:
    """The ``.data/serialization_id`` entry of a torch.save archive (40 digits; empty if it has none)."""
    f = io.BytesIO(archive)
    try:
        return _small_entry(_entries(f, 0, len(archive)), "/.data/serialization_id", archive, f, 0)
    except NotPlain:
        return b""


@functools.cache
def _framer() -> _Framer | None:
    """This process's framer, or None where its bytes differ from torch.save's (logged once)."""
    from torch.utils.serialization import config

    crc32 = config.save.compute_crc32
    config.save.compute_crc32 = False  # torch.save's bytes as the lean writer's: no CRC32
    try:
        samples = [torch.zeros(()), torch.arange(5, dtype=torch.int64), torch.ones(3, 70, dtype=torch.bfloat16),
                   torch.empty(0, 4), torch.ones(1, 3, dtype=torch.float16).as_strided((1, 3), (7, 1))]
        for t in samples:
            reference = _torch_save_bytes(t)
            header, trailer = _Framer(_serialization_id(reference)).frames(t)
            if header + bytes(_bytes_of(t)) + trailer != reference:
                log.warning("torch %s frames a tensor record differently from the lean checkpoint writer; "
                            "every tensor goes through torch.save", torch.__version__)
                return None
        # torch derives the id from what a process saved; it is only reported by torch.load's logging
        return _Framer(_serialization_id(reference))
    finally:
        config.save.compute_crc32 = crc32


def _why_not_lean(data: torch.Tensor, framer: _Framer | None) -> str | None:
    if framer is None:
        return "torch's record format differs"
    if data.dtype not in framer.storage_types:
        return f"dtype {data.dtype} has no legacy storage class"
    if not data.is_contiguous() or data.is_conj() or data.is_neg():
        return "a non-contiguous, conjugate or negated view"
    if data.nbytes >= _LIMIT:
        return "a tensor of 4 GiB or more (zip64 entries)"
    return None


def _write_all(fd: int, buffers: list) -> int:
    """``writev`` until every byte is written (a single call may write part of them); the bytes written."""
    views = [memoryview(b).cast("B") for b in buffers]
    total = sum(len(v) for v in views)
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total


def _record(data, item, framer: _Framer | None, reasons: collections.Counter) -> list:
    """The bytes of one item's record in a DCP data file, as torch's writer writes them."""
    if item.type == WriteItemType.BYTE_IO:  # an object, serialized by the planner already
        return [data.getbuffer()]
    data = data.detach().cpu()
    why = _why_not_lean(data, framer)
    if why is None:
        header, trailer = framer.frames(data)
        return [header, _bytes_of(data), trailer]
    reasons[why] += 1
    if data.untyped_storage().size() != data.nbytes:
        data = data.clone()  # as torch's writer: only the tensor's own bytes
    buf = io.BytesIO()
    torch.save(data, buf)
    return [buf.getbuffer()]


_LOGGED: set[str] = set()


class LeanWriter(FileSystemWriter):
    """torch's ``FileSystemWriter`` (one file per rank, fsynced), its tensor records framed without
    ``torch.save`` (see the module). One thread: producing a tensor and framing it are Python, so more
    threads mostly wait for the interpreter lock."""

    def __init__(self, path):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)

    def _write_data(self, planner, file_queue):
        framer = _framer()
        results, reasons = [], collections.Counter()
        while not file_queue.empty():
            path, file_name, items = file_queue.get_nowait()
            # torch's order: serialized objects, then tensors
            items = [i for i in items if i.type == WriteItemType.BYTE_IO] + \
                [i for i in items if i.type != WriteItemType.BYTE_IO]
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                offset = 0
                for item in items:
                    length = _write_all(fd, _record(planner.resolve_data(item), item, framer, reasons))
                    results.append(WriteResult(index=item.index, size_in_bytes=length,
                                               storage_data=_StorageInfo(file_name, offset, length)))
                    offset += length
                os.fsync(fd)
            finally:
                os.close(fd)
        _log_paths_once(reasons)
        fut: Future = Future()
        fut.set_result(results)
        return fut


def _log_paths_once(reasons: collections.Counter) -> None:
    key = ", ".join(sorted(reasons)) or "none"
    if key not in _LOGGED:
        _LOGGED.add(key)
        if reasons:
            log.info("checkpoint writes: %d record(s) through torch.save (%s); the other tensors framed directly",
                     sum(reasons.values()), "; ".join(f"{n} {why}" for why, n in sorted(reasons.items())))
        else:
            log.info("checkpoint writes: every tensor record framed directly (no torch.save)")
