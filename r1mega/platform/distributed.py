"""Process-group set-up for torchrun, Slurm ``srun`` and plain single-process runs.

Backend: nccl with CUDA, gloo without. After ``init_process_group`` megatron's ``parallel_state`` is
initialised from the (already validated) parallel config, and the model-parallel RNG is seeded.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from r1mega.config.schema import ParallelConfig
from r1mega.platform import call_counts
from r1mega.platform.megatron_compat import ensure_megatron
from r1mega.platform.spawn import free_port

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def launch_env() -> LaunchEnv:
    """Rank and rendezvous from torchrun (RANK/WORLD_SIZE) or Slurm (SLURM_PROCID/SLURM_NTASKS)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = int(env.get("MASTER_PORT", 0)) or (free_port() if world == 1 else 29500)
    if world > 1 and "MASTER_ADDR" not in env:
        raise RuntimeError(
            f"world size {world} but MASTER_ADDR is unset: launch with torchrun, or export "
            "MASTER_ADDR/MASTER_PORT (r1mega's Slurm launcher derives them from SLURM_JOB_NODELIST)."
        )
    return LaunchEnv(rank, world, local, addr, port)


def compute_device() -> torch.device:
    """Where this rank's model and batches live: its CUDA device (set by ``init_process_group``), else CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init_process_group(env: LaunchEnv | None = None, timeout_minutes: int = 10) -> LaunchEnv:
    """Join the default process group (idempotent)."""
    env = env or launch_env()
    if dist.is_initialized():
        return env
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        # Model tensors go over NCCL; the CPU-side bookkeeping collectives (metrics, routing tables,
        # stop flags, weight fingerprints) go over gloo in the same groups, as in verl.
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return env


def init_model_parallel(parallel: ParallelConfig, seed: int) -> None:
    """Megatron ``parallel_state`` for this layout, plus the model-parallel RNG streams."""
    ensure_megatron()
    call_counts.install()  # after the CPU emulation replaced the collectives gloo lacks
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        distributed_timeout_minutes=parallel.timeout_minutes,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    log.info(
        "model parallel ready: world=%d tp=%d cp=%d pp=%d ep=%d etp=%d dp=%d",
        dist.get_world_size(), parallel.tp, parallel.cp, parallel.pp, parallel.ep, parallel.etp or parallel.tp,
        parallel_state.get_data_parallel_world_size(),
    )


def broadcast_from_rank0(obj):
    """Rank 0's picklable ``obj`` on every rank (itself when not distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
