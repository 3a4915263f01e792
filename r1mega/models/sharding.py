"""Where each local parameter shard sits in the full (TP1/PP1/EP1) model.

For every parameter of this rank's ``GPTModel`` chunk: its *canonical* name (global layer and expert
indices), the full shape, and how TP split it (dimension; SwiGLU ``linear_fc1`` splits gate and up
halves separately). From that follow two layout-independent operations used by parity checks,
checkpoints tests and from-scratch runs:

* :func:`init_layout_invariant`: every full tensor is drawn from a generator seeded by its canonical
  name, then sliced, so any layout starts from the same weights as a single process.
* :func:`gather_full` (small models only): assembles full tensors on rank 0 from all ranks' shards.
  The streaming, bounded-memory export for large models is ``r1mega.bridge``.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset  # noqa: E402

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_SCALED_INIT = ("linear_proj.weight", "linear_fc2.weight")
# vectors megatron draws at random (the others start at 1 or 0): drawn per name like the matrices
_DRAWN_VECTORS = ("core_attention.softmax_offset", "mlp.router.bias")


@dataclass(frozen=True)
class ShardInfo:
    local_name: str
    canonical_name: str
    full_shape: tuple[int, ...]
    tp_dim: int | None  # None: replicated over its tensor-parallel group
    tp_rank: int
    tp_size: int
    gated: bool  # [gate; up] halves, each split over TP


def _is_expert(name: str) -> bool:
    return ".mlp.experts." in name


_TIED_OUTPUT = "output_layer.weight"
_EMBEDDING = "embedding.word_embeddings.weight"


def canonical_name(local_name: str, config, layer_offset: int, tied: bool = False) -> str:
    """Name of the tensor in the single-process model. With tied embeddings a pipeline's last stage
    holds a copy of the embedding as ``output_layer.weight`` (one process has no such parameter): it is
    the embedding, so it is initialised, gathered and exported as one."""
    if tied and local_name == _TIED_OUTPUT:
        return _EMBEDDING
    name = _LAYER.sub(lambda m: f"decoder.layers.{int(m[1]) + layer_offset}.", local_name)
    if _is_expert(local_name):
        per_rank = config.num_moe_experts // parallel_state.get_expert_model_parallel_world_size()
        first = parallel_state.get_expert_model_parallel_rank() * per_rank
        name = _EXPERT.sub(lambda m: f".mlp.experts.local_experts.{int(m[1]) + first}.", name)
    return name


def shard_infos(model: torch.nn.Module, config) -> list[ShardInfo]:
    """Sharding of every parameter of this rank's (unwrapped) model chunk."""
    offset = get_transformer_layer_offset(config)
    tied = bool(getattr(getattr(model, "module", model), "share_embeddings_and_output_weights", False))
    infos = []
    for name, param in model.named_parameters():
        if _is_expert(name):
            tp_rank = parallel_state.get_expert_tensor_parallel_rank()
            tp_size = parallel_state.get_expert_tensor_parallel_world_size()
        else:
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            tp_size = parallel_state.get_tensor_model_parallel_world_size()
        split = getattr(param, "tensor_model_parallel", False) and tp_size > 1
        tp_dim = param.partition_dim if split else None
        shape = list(param.shape)
        if tp_dim is not None:
            shape[tp_dim] *= tp_size
        gated = bool(config.gated_linear_unit) and name.endswith(("linear_fc1.weight", "linear_fc1.bias"))
        infos.append(ShardInfo(name, canonical_name(name, config, offset, tied), tuple(shape), tp_dim,
                               tp_rank, tp_size, gated and tp_dim is not None))
    return infos


def shard_of(full: torch.Tensor, info: ShardInfo) -> torch.Tensor:
    """This rank's slice of a full tensor."""
    if info.tp_dim is None:
        return full
    if info.gated:
        halves = full.chunk(2, dim=info.tp_dim)
        return torch.cat([h.chunk(info.tp_size, dim=info.tp_dim)[info.tp_rank] for h in halves],
                         dim=info.tp_dim)
    return full.chunk(info.tp_size, dim=info.tp_dim)[info.tp_rank]


def merge_shards(shards: list[torch.Tensor], info: ShardInfo) -> torch.Tensor:
    """Inverse of :func:`shard_of` given all TP ranks' shards in rank order."""
    if info.tp_dim is None:
        return shards[0]
    if info.gated:
        gates, ups = zip(*(s.chunk(2, dim=info.tp_dim) for s in shards))
        return torch.cat(list(gates) + list(ups), dim=info.tp_dim)
    return torch.cat(shards, dim=info.tp_dim)


def _init_std(canonical: str, config) -> float:
    if canonical.endswith(_SCALED_INIT):
        return config.init_method_std / (2.0 * config.num_layers) ** 0.5
    return config.init_method_std


@torch.no_grad()
def init_layout_invariant(model: torch.nn.Module, config, seed: int) -> None:
    """Re-draw every matrix from a per-name generator so all layouts start identical.

    Vectors (norm weights = 1, biases = 0) are already layout independent and stay as built, except the
    attention sinks and router biases megatron draws (``_DRAWN_VECTORS``).
    """
    params = dict(model.named_parameters())
    for info in shard_infos(model, config):
        param = params[info.local_name]
        if param.dim() < 2 and not info.canonical_name.endswith(_DRAWN_VECTORS):
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(info.canonical_name.encode()))
        full = torch.randn(info.full_shape, generator=gen, dtype=torch.float32)
        full.mul_(_init_std(info.canonical_name, config))
        param.copy_(shard_of(full, info).to(param.dtype))


def gather_full(model: torch.nn.Module, config, tensors: dict[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor] | None:
    """Full canonical tensors on global rank 0 (``None`` elsewhere). Collective over the world.

    ``tensors`` maps local parameter names to what to gather (default: the parameters themselves,
    e.g. pass ``{name: p.main_grad}`` for gradients). Meant for tiny models in tools and tests.
    """
    infos = shard_infos(model, config)
    source = tensors if tensors is not None else dict(model.named_parameters())
    payload = [(info, source[info.local_name].detach().float().cpu().clone()) for info in infos]
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        gathered = [payload]
    else:
        gathered = [None] * world if dist.get_rank() == 0 else None
        dist.gather_object(payload, gathered, dst=0)
        if dist.get_rank() != 0:
            return None
    by_name: dict[str, dict[int, torch.Tensor]] = {}
    info_of: dict[str, ShardInfo] = {}
    for rank, rank_payload in enumerate(gathered):
        for info, tensor in rank_payload:
            first = by_name.setdefault(info.canonical_name, {}).setdefault(info.tp_rank, tensor)
            if first is not tensor and not torch.equal(first, tensor):
                # Replicas (data-parallel copies, TP-replicated norms) must be bit-identical.
                raise RuntimeError(
                    f"{info.canonical_name} (TP shard {info.tp_rank}) differs between replicas: rank {rank} "
                    f"is off by {float((first - tensor).abs().max()):.3e}")
            info_of[info.canonical_name] = info
    full = {}
    for name, shards in by_name.items():
        info = info_of[name]
        missing = [r for r in range(info.tp_size if info.tp_dim is not None else 1) if r not in shards]
        if info.tp_dim is not None and missing:
            raise RuntimeError(f"{name}: no shard received from TP ranks {missing}")
        ordered = [shards[r] for r in sorted(shards)] if info.tp_dim is not None else [next(iter(shards.values()))]
        full[name] = merge_shards(ordered, info)
    return full
