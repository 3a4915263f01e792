"""Import: HF safetensors -> this rank's megatron shards, for any layout.

Each rank reads only the HF tensors its own parameters are made of (safetensors are memory-mapped;
one full tensor at a time, blockwise-FP8 weights dequantised to the parameter's dtype, see
``hf_source``), rebuilds the canonical megatron tensor with the architecture's rules and takes its TP
slice. :class:`HFImporter` hands out one local tensor at a time (a weights-only checkpoint is written
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
from r1mega.bridge.rules import BridgeError
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
        self._check_present()

    def _check_present(self) -> None:
        """Every HF tensor this rank needs exists: fail before any work, naming all that are missing."""
        missing: dict[str, list[str]] = {}
        for info, _ in self.local.values():
            for n in self.hf_names(info):
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

    def _canonical(self, info: ShardInfo) -> str:
        name = info.canonical_name
        return "embedding.word_embeddings.weight" if self.tie and name == "output_layer.weight" else name

    def _load(self, local_name: str, out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """``local_name``'s shard copied into ``out``; with ``out=None`` a tensor of its own (the converted
        tensor itself when the conversion made a new one, so it is not copied a second time)."""
        info, shell = self.local[local_name]
        names = self.hf_names(info)
        hf = [self.source.get(n, dtype) for n in names]
        full = self.arch.to_megatron(self._canonical(info), hf, self.dims, info.full_shape)
        piece = shard_of(full, info)
        if tuple(piece.shape) != tuple(shell.shape):
            raise BridgeError(f"{info.canonical_name}: shard shape {tuple(piece.shape)} != parameter "
                              f"{tuple(shell.shape)}")
        mapped = {h.untyped_storage().data_ptr() for h in hf}  # views of the memory-mapped files
        if out is None and piece.is_contiguous() and piece.dtype == dtype and \
                piece.untyped_storage().data_ptr() not in mapped and piece.untyped_storage().nbytes() == \
                piece.numel() * piece.element_size():
            out = piece  # a new tensor of exactly this shard: no second copy
        else:
            out = torch.empty(shell.shape, dtype=dtype) if out is None else out
            out.copy_(piece)
        del hf, full, piece
        for n in names:
            self.source.release(n)
        self.used.update(names)
        return out

    @torch.no_grad()
    def tensor(self, local_name: str) -> torch.Tensor:
        """A new tensor: this rank's shard of ``local_name`` in the model's dtype."""
        _, shell = self.local[local_name]
        return self._load(local_name, None, shell.dtype)

    @torch.no_grad()
    def load_into_model(self) -> int:
        for local_name, (_, target) in self.local.items():
            self._load(local_name, target, target.dtype)
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
