"""Sharded safetensors in bounded memory: tensors are read from memory maps and written as they stream in.

The safetensors format is an 8-byte little-endian header length, a JSON header (dtype, shape and byte
range of every tensor) and the raw bytes. Reading maps the file and hands out zero-copy views;
:meth:`SafetensorsFile.release` drops a tensor's pages from this process's resident set once its
bytes have been used, so reading a whole checkpoint never holds more than the tensors in use.
Writing streams each tensor's bytes to the file without a copy (views of one parameter, such as the
q/k/v of a fused projection, need none either) and makes the file durable (fsync), as checkpoints are.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
CODES = {v: k for k, v in DTYPES.items()}
_PAGE = mmap.PAGESIZE
# A read fault may map a whole large folio of the page cache (up to one PMD, 2 MiB), pages of the
# neighbouring tensors included; release() drops that much around a tensor so nothing piles up.
_FOLIO = 2 << 20


class SafetensorsError(ValueError):
    """A safetensors file or index that cannot be read as it claims; the message names the file."""


class SafetensorsFile:
    """One ``.safetensors`` file, memory-mapped; tensors are views into the map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise SafetensorsError(f"{self.path}: not a safetensors file (shorter than its header)")
            (length,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{self.path}: unreadable safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, dict] = header
        self.data_start = 8 + length
        for name, entry in header.items():
            if entry["dtype"] not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name} has dtype {entry['dtype']}, which r1mega "
                                       f"does not read (known: {sorted(DTYPES)})")
        self._map: mmap.mmap | None = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entries[name]["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as f:
                # private copy-on-write map: writable views without touching the file
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def get(self, name: str) -> torch.Tensor:
        """A zero-copy view of ``name``; valid as long as this object lives."""
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        dtype, shape = self.dtype(name), tuple(entry["shape"])
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize:
            raise SafetensorsError(f"{self.path}: tensor {name} spans {end - begin} bytes, its shape {shape} "
                                   f"and dtype {entry['dtype']} need {numel * dtype.itemsize}")
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._mapped(), dtype=torch.uint8, count=end - begin,
                                offset=self.data_start + begin)
        return flat.view(dtype).view(shape)

    def release(self, name: str) -> None:
        """Drop the pages of ``name`` (and any its reads mapped around it) from the resident set.

        Views stay valid: a later access re-reads the file.
        """
        if self._map is None:
            return
        begin, end = self.entries[name]["data_offsets"]
        start = max(0, self.data_start + begin - _FOLIO) // _PAGE * _PAGE
        stop = min(len(self._map), self.data_start + end + _FOLIO)
        if stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu")
    if not t.is_contiguous():
        t = t.contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")


def write_safetensors(path: str | Path, tensors: list[tuple[str, torch.Tensor]],
                      metadata: dict[str, str] | None = None, written=None, sync: bool = True) -> int:
    """Write ``tensors`` (in order) as one safetensors file, durably (fsync); returns the bytes of tensor data.

    ``written(name)`` is called after each tensor's bytes went out (e.g. to release a mapped source).
    ``sync=False``: the caller makes the file durable later (:class:`ShardedWriter` fsyncs all its files
    at once, so the disk writes one shard while the next is produced).
    """
    header: dict[str, dict] = {}
    offset = 0
    for name, t in tensors:
        if name in header:
            raise ValueError(f"tensor {name} given twice for {path}")
        if t.dtype not in CODES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = {"__metadata__": metadata or {"format": "pt"}, **header}
    raw = json.dumps(body, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, t in tensors:
            f.write(_tensor_bytes(t))
            if written is not None:
                written(name)
        f.flush()
        if sync:
            os.fsync(f.fileno())
    return offset


class ShardedWriter:
    """One ``model-XXXXX-of-NNNNN.safetensors`` per bucket plus the index (HF layout)."""

    def __init__(self, out_dir: str | Path, num_files: int):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.num_files = max(1, num_files)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._written = 0
        self._unsynced: list[Path] = []  # written, made durable by close()

    def write(self, tensors: list[tuple[str, torch.Tensor]], written=None) -> None:
        self._written += 1
        fname = f"model-{self._written:05d}-of-{self.num_files:05d}.safetensors"
        for name, _ in tensors:
            if name in self.weight_map:
                raise ValueError(f"tensor {name} written twice")
            self.weight_map[name] = fname
        self.total_size += write_safetensors(self.out / fname, tensors, written=written, sync=False)
        self._unsynced.append(self.out / fname)

    def close(self) -> None:
        """Write the index; every file is durable (fsync) when this returns."""
        if self._written != self.num_files:
            raise RuntimeError(f"wrote {self._written} of {self.num_files} safetensors files")
        for path in self._unsynced:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._unsynced.clear()
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        with open(self.out / INDEX, "w") as f:
            f.write(json.dumps(index, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())


class HFReader:
    """Random access to the tensors of an HF checkpoint dir (indexed or single-file), memory-mapped.

    Every file the index names must exist; a missing one is an error naming it and what it holds.
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX
        self._files: dict[str, SafetensorsFile] = {}
        if index.exists():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            by_file: dict[str, list[str]] = {}
            for name, fname in self.weight_map.items():
                by_file.setdefault(fname, []).append(name)
            missing = {f: names for f, names in by_file.items() if not (self.dir / f).is_file()}
            if missing:
                shown = "; ".join(f"{f} (holds {len(n)} tensors, e.g. {sorted(n)[:3]})"
                                  for f, n in sorted(missing.items()))
                raise FileNotFoundError(f"{self.dir}: {INDEX} names file(s) that are not there: {shown}. "
                                        "Download the missing file(s) again.")
            for fname, names in by_file.items():
                held = set(self._file(fname).keys())
                absent = [n for n in names if n not in held]
                if absent:
                    raise SafetensorsError(f"{self.dir}: {INDEX} puts {absent[:3]} in {fname}, which does not "
                                           "hold them; the index and the files disagree")
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.dir}: no *.safetensors files")
            self.weight_map = {}
            for f in files:
                for k in self._file(f.name).keys():
                    self.weight_map[k] = f.name

    def _file(self, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(self.dir / fname)
        return self._files[fname]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        """A zero-copy view (read-only in spirit: writes stay private to this process)."""
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: tensor {name!r} is missing")
        return self._file(self.weight_map[name]).get(name)

    def release(self, name: str) -> None:
        self._file(self.weight_map[name]).release(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._file(self.weight_map[name]).dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(self.weight_map[name]).shape(name)

    def nbytes(self, name: str) -> int:
        n = self.dtype(name).itemsize
        for s in self.shape(name):
            n *= s
        return n
