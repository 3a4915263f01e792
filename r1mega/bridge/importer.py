"""Import: HF safetensors -> this rank's megatron shards, for any layout.

Each rank reads only the HF tensors its own parameters are made of (safetensors are memory-mapped;
one full tensor at a time, blockwise-FP8 weights dequantised to the parameter's dtype, see
``hf_source``; from an HF tensor that packs a layer's experts, gpt-oss, only one expert's slice),
rebuilds the canonical megatron tensor with the architecture's rules and takes its TP slice.
:class:`HFImporter` hands out one local tensor at a time (a weights-only checkpoint is written
from a meta-device model that way); :func:`import_hf` copies all of them into a live model. No
communication except a final check of which HF tensors no rank used.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.distributed as dist

from r1mega.bridge.export import local_tensors
from r1mega.bridge.hf_config import dims_of
from r1mega.bridge.hf_source import HFSource
from r1mega.bridge.rules import BridgeError, Gated
from r1mega.models.registry import architecture
from r1mega.models.sharding import ShardInfo, shard_of

log = logging.getLogger(__name__)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _layer_of(hf_name: str) -> int | None:
    m = _LAYER.match(hf_name)
    return int(m[1]) if m else None


class HFImporter:
    """This rank's shard of each model tensor, built from an HF directory on request."""

    def __init__(self, model: torch.nn.Module, config, model_cfg, source: HFSource):
        self.arch = architecture(model_cfg.preset)
        self.dims = dims_of(model_cfg)
        self.source = source
        self.tie = bool(model_cfg.tie_word_embeddings)
        self.local = {info.local_name: (info, t) for info, t in local_tensors(model, config)}
        self.used: set[str] = set()
        self._pending: list[str] = []  # read, to be released (see _done)
        self._check_present()

    def _check_present(self) -> None:
        """Every HF tensor this rank needs exists: fail before any work, naming all that are missing."""
        missing: dict[str, list[str]] = {}
        for info, _ in self.local.values():
            for n in self.hf_names(info):
                n = self.arch.stored(n)[0]
                if n not in self.source:
                    missing.setdefault(n, []).append(info.canonical_name)
        if not missing:
            return
        first_mtp = f"model.layers.{self.dims.num_layers}."
        mtp = sorted(n for n in missing if _layer_of(n) is not None and _layer_of(n) >= self.dims.num_layers)
        if mtp:
            raise BridgeError(f"{self.source.dir}: MTP layer(s) from {first_mtp}* (config.json's "
                              f"num_nextn_predict_layers) are present only in part: missing {mtp}. Complete the "
                              "files, or convert fewer MTP layers (--mtp-layers)")
        shown = [f"{n} (for megatron {', '.join(missing[n])})" for n in sorted(missing)[:10]]
        raise BridgeError(f"{self.source.dir}: missing HF tensor(s) {shown}"
                          f"{f' ... {len(missing) - 10} more' if len(missing) > 10 else ''}")

    def hf_names(self, info: ShardInfo) -> list[str]:
        names = self.arch.hf_names(self._canonical(info), self.dims)
        if self.arch.mtp_copies_optional:  # the copies the files hold are read (and checked equal)
            names = [n for n in names if n in self.source or not self.arch.is_mtp_copy(n, self.dims)]
        return names

    def _get(self, hf_name: str, dtype: torch.dtype) -> torch.Tensor:
        stored, expert = self.arch.stored(hf_name)
        if expert is None:
            return self.source.get(stored, dtype)
        # slice before any dtype conversion: only this expert's rows are converted
        packed = self.source.get(stored, self.source.reader.dtype(stored)) if not self.source.is_quantized(
            stored) else self.source.get(stored, dtype)
        if packed.shape[0] != self.dims.num_experts:
            raise BridgeError(f"{stored}: {packed.shape[0]} experts, the model has {self.dims.num_experts}")
        return packed[expert].to(dtype)

    def _canonical(self, info: ShardInfo) -> str:
        name = info.canonical_name
        return "embedding.word_embeddings.weight" if self.tie and name == "output_layer.weight" else name

    def _load(self, local_name: str, out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """``local_name``'s shard copied into ``out``; with ``out=None`` a tensor of its own (the converted
        tensor itself when the conversion made a new one, so it is not copied a second time)."""
        info, shell = self.local[local_name]
        names = self.hf_names(info)
        hf = [self._get(n, dtype) for n in names]
        full = self.arch.to_megatron(self._canonical(info), hf, self.dims, info.full_shape)
        piece = shard_of(full, info)
        if tuple(piece.shape) != tuple(shell.shape):
            raise BridgeError(f"{info.canonical_name}: shard shape {tuple(piece.shape)} != parameter "
                              f"{tuple(shell.shape)}")
        names = list(dict.fromkeys(self.arch.stored(n)[0] for n in names))
        if out is None and _exact(piece, dtype):
            # a tensor of exactly this shard (converted, or a stored tensor's view of its file): no copy
            out = piece
        else:
            out = torch.empty(shell.shape, dtype=dtype) if out is None else out
            out.copy_(piece)
        del hf, full, piece
        self._done(names)
        return out

    def _done(self, names: list[str]) -> None:
        """``names`` were read. Their mapped pages leave the resident set when the next tensor is asked for:
        by then the checkpoint writer has written a file view handed out for this one (its pages would fault
        back in if released earlier), and a view stays valid after a release (it re-reads the file)."""
        self._release_pending()
        self._pending = names
        self.used.update(names)

    def _release_pending(self) -> None:
        for n in self._pending:
            self.source.release(n)
        self._pending = []

    @torch.no_grad()
    def tensor(self, local_name: str) -> torch.Tensor:
        """A new tensor: this rank's shard of ``local_name`` in the model's dtype."""
        _, shell = self.local[local_name]
        return self._load(local_name, None, shell.dtype)

    @torch.no_grad()
    def rows(self, local_name: str, start: int, stop: int) -> torch.Tensor | None:
        """Rows ``start:stop`` of ``local_name``'s shard when they are one half of a SwiGLU ``[gate; up]``
        shard: made from that half's HF tensor alone (no concatenation); None for anything else."""
        info, shell = self.local[local_name]
        rule, _ = self.arch.rule_for(self._canonical(info), self.dims)
        half_rows = shell.shape[0] // 2 if shell.dim() else 0
        if type(rule) is not Gated or info.tp_dim not in (None, 0) or (info.tp_dim == 0) != info.gated \
                or not half_rows or (start, stop) not in ((0, half_rows), (half_rows, 2 * half_rows)):
            return None
        name = self.hf_names(info)[start // half_rows]
        hf = self.source.get(name, shell.dtype)
        full_half = (info.full_shape[0] // 2, *info.full_shape[1:])
        if tuple(hf.shape) != full_half:
            raise BridgeError(f"{info.canonical_name}: HF tensor {name} has shape {tuple(hf.shape)}, the megatron "
                              f"model expects {full_half} (one half of {tuple(info.full_shape)})")
        piece = hf if info.tp_dim is None else hf.chunk(info.tp_size, dim=0)[info.tp_rank]
        if not _exact(piece, shell.dtype):  # a TP slice of the HF tensor: a tensor of its own
            piece = piece.clone(memory_format=torch.contiguous_format)
        del hf
        self._done([name])
        return piece

    @torch.no_grad()
    def load_into_model(self) -> int:
        for local_name, (_, target) in self.local.items():
            self._load(local_name, target, target.dtype)
        self._release_pending()
        return len(self.local)

    def unused(self) -> list[str]:
        """HF tensors no rank read (collective)."""
        used = self.used
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, sorted(used))
            used = set().union(*map(set, parts))
        return sorted(set(self.source.names()) - used)


def _exact(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """``t`` is contiguous, of ``dtype``, and its storage holds exactly its elements (a writer saves the
    whole storage of what it is given, so anything else would be copied out first)."""
    return t.dtype == dtype and t.is_contiguous() and t.storage_offset() == 0 and \
        t.untyped_storage().nbytes() == t.numel() * t.element_size()


@torch.no_grad()
def import_hf(model: torch.nn.Module, config, model_cfg, hf_dir: str | Path | HFSource) -> dict:
    """Load an HF checkpoint into this rank's model chunk. Collective (for the unused-tensor report).

    Returns ``{"loaded": n_local_tensors, "unused": [HF names no rank read]}``. Missing tensors and
    shape mismatches raise :class:`BridgeError` naming the tensor.
    """
    source = hf_dir if isinstance(hf_dir, HFSource) else HFSource(hf_dir)
    importer = HFImporter(model, config, model_cfg, source)
    loaded = importer.load_into_model()
    unused = importer.unused()
    if unused:
        log.warning("%d HF tensors were not used (e.g. %s)", len(unused), unused[:5])
    return {"loaded": loaded, "unused": unused}
