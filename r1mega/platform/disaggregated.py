"""Disaggregated layout: one launcher world split into learner ranks and rollout-engine ranks.

The launcher (torchrun, srun, ``r1mega.platform.spawn``) starts ``WORLD_SIZE`` processes as usual.
The last ``engine_ranks`` of them run rollout engines, the others train. Learners form the default
``torch.distributed`` group among themselves (megatron's ``parallel_state`` and every r1mega collective
use the default group, so engines must not be in it); learner rank 0 and the engine ranks form a
second gloo group, the *transfer group*, for rollouts (engines -> learner 0) and weights (learner 0 ->
engines). It is built from its own TCP store on ``MASTER_PORT + 1`` (``R1MEGA_TRANSFER_PORT``
overrides) with ``ProcessGroupGloo`` directly: engine ranks have no default group.
"""

from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from r1mega.platform.distributed import LaunchEnv, launch_env


class TransferGroup:
    """Learner rank 0 (transfer rank 0) and the engine ranks (1..R): object and tensor broadcasts."""

    def __init__(self, rank: int, size: int, addr: str, port: int, timeout_minutes: float = 10.0):
        timeout = datetime.timedelta(minutes=timeout_minutes)
        self.rank, self.size = rank, size
        self._store = dist.TCPStore(addr, port, size, rank == 0, timeout=timeout)
        self._pg = dist.ProcessGroupGloo(dist.PrefixStore("r1mega-transfer", self._store), rank, size, timeout)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self._pg.broadcast(tensor, src).wait()
        return tensor

    def broadcast_object(self, obj, src: int):
        """``obj`` from transfer rank ``src`` on every member (pickled; tensors travel inline)."""
        if self.rank == src:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            self.broadcast(torch.tensor([payload.numel()], dtype=torch.int64), src)
            self.broadcast(payload, src)
            return obj
        size = self.broadcast(torch.zeros(1, dtype=torch.int64), src)
        payload = self.broadcast(torch.empty(int(size), dtype=torch.uint8), src)
        return pickle.loads(payload.numpy().tobytes())


@dataclass
class Role:
    """This process's part in a disaggregated run."""

    kind: str  # "learner" | "engine"
    world: LaunchEnv  # the launcher's world
    learners: int  # learner ranks (the default group's size on learners)
    engine_index: int = -1  # 0..R-1 on engine ranks
    transfer: Optional[TransferGroup] = None  # learner rank 0 and engine ranks only
    # learner rank 0: False once an exchange with the engines broke off mid-message (an engine failed, a
    # transfer raised); nothing more is sent to them then (they stop when the learners' processes exit)
    engines_reachable: bool = True

    @property
    def is_learner(self) -> bool:
        return self.kind == "learner"

    @property
    def engine_src(self) -> list[int]:
        """Transfer ranks of the engines."""
        return list(range(1, self.world.world_size - self.learners + 1))


def split_world(engine_ranks: int, timeout_minutes: int = 10, env: Optional[LaunchEnv] = None) -> Role:
    """Join the learner default group or become an engine rank; build the transfer group."""
    env = env or launch_env()
    learners = env.world_size - engine_ranks
    if engine_ranks < 1 or learners < 1:
        raise ValueError(f"world size {env.world_size} cannot hold {engine_ranks} engine rank(s) and at least one "
                         "learner: launch more processes or change rollout.engine_ranks")
    port = int(os.environ.get("R1MEGA_TRANSFER_PORT", env.master_port + 1))
    if env.rank < learners:
        from r1mega.platform.distributed import init_process_group

        init_process_group(LaunchEnv(env.rank, learners, env.local_rank, env.master_addr, env.master_port),
                           timeout_minutes=timeout_minutes)
        transfer = None
        if env.rank == 0:
            transfer = TransferGroup(0, engine_ranks + 1, env.master_addr, port, timeout_minutes)
        return Role("learner", env, learners, transfer=transfer)
    index = env.rank - learners
    transfer = TransferGroup(index + 1, engine_ranks + 1, env.master_addr, port, timeout_minutes)
    return Role("engine", env, learners, engine_index=index, transfer=transfer)
