"""Which rollout engines a colocated run has, and which learner ranks and devices each one shares.

Every rollout-TP group of learner ranks runs one engine (verl: one vLLM replica per rollout-TP group;
NeMo-RL: one per TP x PP bundle): ``world_size / rollout.tp`` engines, engine ``e`` on ranks
``e * tp .. e * tp + tp - 1`` and the GPUs those ranks use, as a child process of its first rank (the
owner). A world smaller than ``rollout.tp`` has one engine, on rank 0, with ``rollout.tp`` worker
processes of its own. A step's prompts go round-robin to the engines, so a GRPO group (one prompt's
``n`` samples) always stays on one engine and each engine gets the same number of prompts (+- 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class EnginePlan:
    world_size: int
    rollout_tp: int

    @property
    def num_engines(self) -> int:
        return max(1, self.world_size // self.rollout_tp)

    def ranks(self, engine: int) -> list[int]:
        """The learner ranks whose devices engine ``engine`` shares (its first one owns it)."""
        if self.world_size < self.rollout_tp:
            return list(range(self.world_size))
        return list(range(engine * self.rollout_tp, (engine + 1) * self.rollout_tp))

    def engine_of(self, rank: int) -> Optional[int]:
        """The engine ``rank`` owns, or ``None``."""
        if rank % self.rollout_tp or rank // self.rollout_tp >= self.num_engines:
            return None
        return rank // self.rollout_tp

    def prompts_of(self, engine: int, count: int) -> list[int]:
        """Indices (into the step's prompts) that engine ``engine`` samples: round-robin."""
        return list(range(engine, count, self.num_engines))

    def devices(self, engine: int, local_world_size: int, visible: Optional[str] = None) -> list[str]:
        """The device ids engine ``engine``'s ranks use on their node (``CUDA_VISIBLE_DEVICES`` order)."""
        ids = [v.strip() for v in (visible or "").split(",") if v.strip()]
        local = [r % max(1, local_world_size) for r in self.ranks(engine)]
        if self.world_size < self.rollout_tp:  # one engine with more workers than learner ranks
            local = list(range(self.rollout_tp))
        return [ids[i] if i < len(ids) else str(i) for i in local]

    def describe(self, local_world_size: int, on_gpu: bool) -> str:
        """One line per engine: its ranks and devices (logged at start-up)."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        head = f"rollout plan: {self.num_engines} engine(s) of rollout TP {self.rollout_tp} over {self.world_size} " \
               f"learner rank(s)"
        lines = [head]
        for e in range(self.num_engines):
            where = (f"GPUs {','.join(self.devices(e, local_world_size, visible))}" if on_gpu
                     else "a child process on the CPU")
            lines.append(f"  engine {e}: ranks {self.ranks(e)} (owner rank {self.ranks(e)[0]}), {where}")
        return "\n".join(lines)
