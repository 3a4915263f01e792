"""Streaming export: this rank's megatron shards -> full HF-named tensors, in bounded buckets.

Collective over the world (every rank must iterate the generator to the end). The plan is made from
metadata only: every rank all-gathers the list of tensors it holds (canonical name, full shape,
TP split), so all ranks agree on one global order of canonical tensors and on which rank is the
source of each TP shard (the lowest global rank that holds it; data-parallel and TP-replicated
copies are not sent twice). The tensors are then cut into buckets of about ``bucket_bytes``; for a
bucket each source rank packs its shards into one flat buffer per dtype and broadcasts it, every
rank merges TP shards into full tensors and applies the architecture's rules. Only one bucket (its
received buffers plus the merged full tensors) is alive at a time, on every rank: nothing ever
holds the whole model.

With one process nothing is copied: full tensors are the parameters themselves, and the HF tensors
yielded are views of them (valid until the next bucket; do not modify them). With ``read`` (one process,
a meta-device model of layout 1) the full tensors of each bucket come from ``read(names)`` instead,
e.g. straight from a checkpoint (``ckpt.weights.WeightsReader``), so nothing but one bucket is ever held.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from r1mega.bridge.rules import Architecture, Dims, packed_tensors
from r1mega.models.registry import architecture
from r1mega.models.sharding import ShardInfo, canonical_name, merge_shards, shard_infos

from megatron.core.transformer.transformer_layer import get_transformer_layer_offset  # noqa: E402

DEFAULT_BUCKET_BYTES = 256 << 20
_BUFFERS = ("mlp.router.expert_bias",)  # state buffers that are part of the HF model
_ORDER = re.compile(r"decoder\.layers\.(\d+)\.(?:.*local_experts\.(\d+)\.)?")


def local_tensors(model: torch.nn.Module, config) -> list[tuple[ShardInfo, torch.Tensor]]:
    """(sharding info, local tensor) for every exported tensor of this rank's chunk."""
    params = dict(model.named_parameters())
    out = [(info, params[info.local_name]) for info in shard_infos(model, config)]
    offset = get_transformer_layer_offset(config)
    for name, buf in model.named_buffers():
        if name.endswith(_BUFFERS):
            out.append((ShardInfo(name, canonical_name(name, config, offset), tuple(buf.shape), None, 0, 1, False),
                        buf))
    return out


def _sort_key(name: str):
    if name.startswith("embedding."):
        return (0, 0, -1, name)
    m = _ORDER.match(name)
    if m:
        return (1, int(m[1]), int(m[2]) if m[2] is not None else -1, name)
    return (2 if "final_layernorm" in name else 3, 0, -1, name)


@dataclass
class _Entry:
    name: str
    full_shape: tuple[int, ...]
    dtype: torch.dtype
    info: ShardInfo  # tp_rank of the first holder; tp_dim/tp_size/gated are what matter
    sources: dict[int, int] = field(default_factory=dict)  # tp shard -> global source rank

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.full_shape:
            n *= s
        return n * self.dtype.itemsize

    @property
    def shards(self) -> int:
        return self.info.tp_size if self.info.tp_dim is not None else 1


def _plan(local: list[tuple[ShardInfo, torch.Tensor]]) -> list[_Entry]:
    meta = [(info, str(t.dtype).removeprefix("torch.")) for info, t in local]
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, meta)
    else:
        parts = [meta]
    entries: dict[str, _Entry] = {}
    for rank, part in enumerate(parts):
        for info, dtype in part:
            e = entries.setdefault(info.canonical_name, _Entry(info.canonical_name, tuple(info.full_shape),
                                                               getattr(torch, dtype), info))
            shard = info.tp_rank if info.tp_dim is not None else 0
            e.sources.setdefault(shard, rank)
    for e in entries.values():
        missing = [s for s in range(e.shards) if s not in e.sources]
        if missing:
            raise RuntimeError(f"{e.name}: no rank holds TP shard(s) {missing}")
    return [entries[n] for n in sorted(entries, key=_sort_key)]


def _buckets(entries: list[_Entry], bucket_bytes: int, group=None) -> list[list[_Entry]]:
    """Consecutive entries in buckets of about ``bucket_bytes``; entries with the same non-None
    ``group(entry)`` (the experts of an HF tensor that packs them all) share a bucket."""
    out, cur, size, last = [], [], 0, None
    for e in entries:
        key = group(e) if group is not None else None
        if cur and size + e.nbytes > bucket_bytes and (key is None or key != last):
            out.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += e.nbytes
        last = key
    if cur:
        out.append(cur)
    return out


@dataclass
class ExportStats:
    buckets: int = 0
    tensors: int = 0
    bytes: int = 0
    peak_bucket_bytes: int = 0  # received buffers + merged full tensors alive at once (this rank)


class StreamingExporter:
    """Iterate ``buckets()`` -> lists of (HF name, tensor); collective over the world."""

    def __init__(self, model: torch.nn.Module, config, model_cfg, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dtype: torch.dtype | None = None, arch: Architecture | None = None,
                 read: Callable[[list[str]], dict[str, torch.Tensor]] | None = None):
        from r1mega.bridge.hf_config import dims_of

        self.arch = arch or architecture(model_cfg.preset)
        self.dims: Dims = dims_of(model_cfg)
        self.tie = bool(model_cfg.tie_word_embeddings)
        self.dtype = dtype
        self.bucket_bytes = int(bucket_bytes)
        self.local = {info.canonical_name: (info, t) for info, t in local_tensors(model, config)}
        # where this rank's shards live: broadcasts receive into the same device on every rank
        self.device = next((t.device for _, t in self.local.values()), torch.device("cpu"))
        self.entries = [e for e in _plan(list(self.local.values()))
                        if not (self.tie and e.name == "output_layer.weight")]
        for e in self.entries:  # unmapped tensors fail before any data moves
            self.arch.rule_for(e.name, self.dims)
        self.stats = ExportStats()
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if read is not None and self.world != 1:
            raise ValueError("reading full tensors (read=...) is a single-process export")
        self.read = read

    def hf_names(self) -> list[str]:
        names = [n for e in self.entries for n in self.arch.hf_names(e.name, self.dims)]
        return list(dict.fromkeys(self.arch.stored(n)[0] for n in names))

    def plan(self) -> list[list[_Entry]]:
        """The buckets :meth:`buckets` yields, in order (a packed expert tensor's experts share one)."""
        return _buckets(self.entries, self.bucket_bytes, lambda e: self.arch.packed_layer(e.name, self.dims))

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def _gather_bucket(self, bucket: list[_Entry]) -> dict[str, torch.Tensor]:
        """Full megatron tensors of one bucket, on every rank."""
        if self.read is not None:
            full = self.read([e.name for e in bucket])
            self.stats.peak_bucket_bytes = max(self.stats.peak_bucket_bytes, sum(e.nbytes for e in bucket))
            return full
        if self.world == 1:
            return {e.name: self.local[e.name][1].detach() for e in bucket}
        # (source rank, dtype) -> [(entry, shard index)] in bucket order
        groups: dict[tuple[int, torch.dtype], list[tuple[_Entry, int]]] = {}
        for e in bucket:
            for shard, src in sorted(e.sources.items()):
                groups.setdefault((src, e.dtype), []).append((e, shard))
        shards: dict[tuple[str, int], torch.Tensor] = {}
        alive = 0
        for (src, dtype), items in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            numels = [e.nbytes // e.dtype.itemsize // e.shards for e, _ in items]
            if src == self.rank:
                flat = torch.cat([self.local[e.name][1].detach().reshape(-1) for e, _ in items])
            else:
                flat = torch.empty(sum(numels), dtype=dtype, device=self.device)  # the same on every rank
            dist.broadcast(flat, src=src)
            alive += flat.numel() * flat.element_size()
            for (e, shard), piece in zip(items, flat.split(numels)):
                info = e.info
                shape = list(e.full_shape)
                if info.tp_dim is not None:
                    shape[info.tp_dim] //= info.tp_size
                shards[(e.name, shard)] = piece.view(shape)
        full = {}
        for e in bucket:
            parts = [shards[(e.name, s)] for s in range(e.shards)]
            full[e.name] = merge_shards(parts, e.info) if e.shards > 1 else parts[0]
            if e.shards > 1:
                alive += e.nbytes
        self.stats.peak_bucket_bytes = max(self.stats.peak_bucket_bytes, alive)
        return full

    def buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        for bucket in self.plan():
            full = self._gather_bucket(bucket)
            out = []
            for e in bucket:
                for name, t in self.arch.to_hf(e.name, full[e.name], self.dims):
                    if self.dtype is not None and t.dtype != self.dtype:
                        t = t.to(self.dtype)
                    out.append((name, t))
            out = packed_tensors(self.arch, out, self.dims.num_experts)
            for _, t in out:
                self.stats.tensors += 1
                self.stats.bytes += t.numel() * t.element_size()
            self.stats.buckets += 1
            yield out
            del full, out

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in self.buckets():
            yield from bucket


def export_hf_buckets(model, config, model_cfg, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                      dtype: torch.dtype | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Buckets of (HF name, full tensor) for the whole model, on every rank. Collective."""
    return StreamingExporter(model, config, model_cfg, bucket_bytes, dtype).buckets()
