"""Import: HF safetensors -> this rank's megatron shards, for any layout.

Each rank reads only the HF tensors its own parameters are made of (safetensors are memory-mapped;
one full tensor at a time, blockwise-FP8 weights dequantised to the parameter's dtype, see
``hf_source``), rebuilds the canonical megatron tensor with the architecture's rules and copies its TP
slice into the parameter. No communication except a final check of which HF tensors no rank used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from r1mega.bridge.export import local_tensors
from r1mega.bridge.hf_config import dims_of
from r1mega.bridge.rules import BridgeError, architecture
from r1mega.bridge.hf_source import HFSource
from r1mega.models.sharding import shard_of

log = logging.getLogger(__name__)


@torch.no_grad()
def import_hf(model: torch.nn.Module, config, model_cfg, hf_dir: str | Path | HFSource) -> dict:
    """Load an HF checkpoint into this rank's model chunk. Collective (for the unused-tensor report).

    Returns ``{"loaded": n_local_tensors, "unused": [HF names no rank read]}``. Missing tensors and
    shape mismatches raise :class:`BridgeError` naming the tensor.
    """
    arch = architecture(model_cfg.preset)
    dims = dims_of(model_cfg)
    reader = hf_dir if isinstance(hf_dir, HFSource) else HFSource(hf_dir)
    tie = bool(model_cfg.tie_word_embeddings)
    used: set[str] = set()
    loaded = 0
    for info, target in local_tensors(model, config):
        name = info.canonical_name
        if tie and name == "output_layer.weight":
            name = "embedding.word_embeddings.weight"
        hf_names = arch.hf_names(name)
        missing = [n for n in hf_names if n not in reader]
        if missing:
            raise BridgeError(f"{reader.dir}: missing HF tensor(s) {missing} needed for megatron {name}")
        hf = [reader.get(n, target.dtype) for n in hf_names]
        full = arch.to_megatron(name, hf, dims, info.full_shape)
        piece = shard_of(full, info)
        if tuple(piece.shape) != tuple(target.shape):
            raise BridgeError(f"{name}: shard shape {tuple(piece.shape)} != parameter {tuple(target.shape)}")
        target.copy_(piece)
        del hf, full, piece
        for n in hf_names:
            reader.release(n)
        used.update(hf_names)
        loaded += 1
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, sorted(used))
        used = set().union(*map(set, parts))
    unused = sorted(set(reader.names()) - used)
    if unused:
        log.warning("%d HF tensors were not used (e.g. %s)", len(unused), unused[:5])
    return {"loaded": loaded, "unused": unused}
