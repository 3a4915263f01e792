"""Distributed checkpoints: megatron ``dist_checkpointing`` with an atomic commit, loadable in any layout.

    from r1mega.ckpt import save_checkpoint, load_checkpoint
    save_checkpoint(tm, "runs/x/ckpt", step, extra={"consumed_samples": n}, keep_last=2)
    info = load_checkpoint(tm, "runs/x/ckpt")        # follows <root>/latest
    step, extra = info["step"], info["extra"]
    save_weights(module, config, "runs/x/converted", resolve=...)  # model tensors only (conversion)

Importing this package does not import megatron; the functions call ``ensure_megatron()`` first.
"""

from r1mega.ckpt.atomic import committed_steps, read_latest, resolve_checkpoint_dir
from r1mega.ckpt.dist_ckpt import (
    DEFAULT_OPTIM_SHARDING,
    link_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from r1mega.ckpt.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    SimulatedCrash,
)
from r1mega.ckpt.weights import WeightsReader, save_weights

__all__ = [
    "DEFAULT_OPTIM_SHARDING",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "IncompleteCheckpointError",
    "SimulatedCrash",
    "committed_steps",
    "link_checkpoint",
    "load_checkpoint",
    "read_latest",
    "read_meta",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "save_weights",
    "WeightsReader",
]
