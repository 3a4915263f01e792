"""Routing replay for the MoE routers (R2/R3): force each router's top-k expert choice per token.

Why: the rollout engine and the learner compute slightly different router logits (kernels, batch
shapes), so near-ties pick different experts and a sampled token is then scored by another
sub-network than the one that sampled it. Replaying a recorded choice removes that source of
mismatch: R3 replays the engine's choices, R2 the learner's own choices from the old-logprob pass.
Only the *indices* are forced; the routing weights are still the learner's softmax/sigmoid of its
own logits at the chosen experts, so the router keeps its gradient.

Mechanism: megatron-core's ``RouterReplay`` (``transformer/moe/router_replay.py``, switched on by
``TransformerConfig.moe_enable_routing_replay``).
r1mega does not use megatron's process-global instance list (a policy and its frozen reference live
in one process, so a list-position API would mix them up); :class:`RoutingReplay` finds the routers
of one model and lays a *global* table of choices ``[B, S-1, L_moe, k]`` (rows as fed to the model,
MoE layers in global order, global expert ids) out the way each router sees its tokens:

- megatron's ``[s, b]`` token order, flattened;
- with sequence parallelism, this TP rank's chunk of ``s`` (the router sees only that chunk);
- under PP, only this stage's MoE layers (global layer numbers map to table columns);
- under EP nothing: the router runs before token dispatch and the ids are global.

Packing and padding are the caller's: a packed micro-batch is one row ``[1, T]``; positions with no
recorded choice (padding) must still hold valid, distinct expert ids (see ``rl.routing``).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
import torch.distributed as dist

from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction  # noqa: E402

log = logging.getLogger(__name__)


class KeepOwnRouterReplay(RouterReplay):
    """megatron's ``RouterReplay`` that also records the router's own top-k while replaying.

    Why: the mismatch metric compares the learner's own choice with the engine's; recording it
    in the replayed pass avoids a second forward. The extra top-k runs without gradient.
    """

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        if self.router_replay_action == RouterReplayAction.REPLAY_FORWARD:
            with torch.no_grad():
                self.record_indices(default_compute_topk(scores.detach(), topk, num_groups, group_topk)[1])
        return super().get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)


def moe_layer_numbers(config) -> list[int]:
    """Global 1-based numbers of the MoE layers, in order (table column ``i`` = ``result[i]``)."""
    freq = config.moe_layer_freq
    pattern = list(freq) if isinstance(freq, (list, tuple)) else [int(i % freq == 0) for i in range(config.num_layers)]
    return [i + 1 for i, is_moe in enumerate(pattern) if is_moe]


def install(model: torch.nn.Module) -> None:
    """Give every router of ``model`` its own replay handle (called once when the model is built).

    megatron appended its instances to a process-global list; they are removed from it (r1mega
    addresses them per model) and replaced by :class:`KeepOwnRouterReplay`.
    """
    for router in _routers(model):
        if router.router_replay is None:
            continue
        mine = KeepOwnRouterReplay()
        for rr in (router.router_replay, mine):
            if rr in RouterReplay.global_router_replay_instances:
                RouterReplay.global_router_replay_instances.remove(rr)
        router.router_replay = mine


def _routers(model) -> list:
    return [m for m in model.modules() if isinstance(m, TopKRouter)]


class RoutingReplay:
    """Replay / record handle over the routers of one model chunk (this rank's stage)."""

    def __init__(self, model: torch.nn.Module, config):
        if getattr(config, "recompute_granularity", None):
            raise ValueError("routing replay with activation recompute is not supported (the recomputed forward "
                             "would see a later micro-batch's choices): unset recompute or set rl.routing_replay=none")
        self.config = config
        self.topk = config.moe_router_topk
        self.layer_numbers = moe_layer_numbers(config)
        column = {n: i for i, n in enumerate(self.layer_numbers)}
        self.routers = []  # (table column, router)
        # the decoder's routers: MTP layers (models/mtp.py) do not run in the forwards that replay
        for router in _routers(getattr(model, "decoder", model)):
            if router.router_replay is None:
                raise RuntimeError("this model was built without routing replay: build it through "
                                   "r1mega.models.policy.build_policy (sets moe_enable_routing_replay)")
            self.routers.append((column[router.layer_number], router))
        self.routers.sort(key=lambda cr: cr[0])

    @property
    def num_moe_layers(self) -> int:
        return len(self.layer_numbers)

    # ------------------------------------------------------------------ layout
    def _sp(self) -> tuple[int, int]:
        if self.config.sequence_parallel:
            return (parallel_state.get_tensor_model_parallel_rank(),
                    parallel_state.get_tensor_model_parallel_world_size())
        return 0, 1

    def _local_rows(self, s: int) -> slice:
        rank, size = self._sp()
        if s % size:
            raise ValueError(f"sequence length {s} does not split over {size} sequence-parallel ranks")
        chunk = s // size
        return slice(rank * chunk, (rank + 1) * chunk)

    def _check(self, table: torch.Tensor) -> None:
        if table.dim() != 4 or table.size(2) != self.num_moe_layers or table.size(3) != self.topk:
            raise ValueError(f"routing table of shape {tuple(table.shape)}: expected [rows, positions, "
                             f"{self.num_moe_layers} MoE layers, top-{self.topk}]")

    # ------------------------------------------------------------------ actions
    def set_replay(self, table: torch.Tensor) -> None:
        """Before a forward of a micro-batch with tokens ``[b, s]``: replay ``table`` ``[b, s, L, k]``."""
        self._check(table)
        b, s = table.shape[:2]
        local = table.transpose(0, 1)[self._local_rows(s)]  # [s_local, b, L, k], megatron's token order
        for col, router in self.routers:
            idx = local[:, :, col, :].reshape(-1, self.topk).to(router.weight.device, torch.long)
            router.router_replay.set_target_indices(idx)
            router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def set_record(self) -> None:
        """Before a forward: route as usual and record the choices."""
        for _, router in self.routers:
            router.router_replay.set_router_replay_action(RouterReplayAction.RECORD)

    def recorded(self, b: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """After a forward: this rank's own choices as a partial table ``[b, s, L, k]`` (zeros where
        another rank routes) and a ``[b, s, L]`` bool mask of the entries this rank filled."""
        table = torch.zeros(b, s, self.num_moe_layers, self.topk, dtype=torch.long)
        filled = torch.zeros(b, s, self.num_moe_layers, dtype=torch.bool)
        rows = self._local_rows(s)
        for col, router in self.routers:
            idx = router.router_replay.get_recorded_indices()
            if idx is None:
                raise RuntimeError("no routing was recorded: call set_record() or set_replay() before the forward")
            table[:, rows, col] = idx.reshape(rows.stop - rows.start, b, self.topk).transpose(0, 1).to(torch.long)
            filled[:, rows, col] = True
        return table, filled

    def clear(self) -> None:
        """Back to plain routing; drops targets and recordings."""
        for _, router in self.routers:
            router.router_replay.clear_indices()
            router.router_replay.clear_router_replay_action()

    @contextmanager
    def session(self):
        """Clears on exit, whatever happened inside."""
        try:
            yield self
        finally:
            self.clear()


def for_model(model: torch.nn.Module, config) -> RoutingReplay:
    """The (cached) :class:`RoutingReplay` of ``model``."""
    handle = model.__dict__.get("_r1mega_routing_replay")
    if handle is None:
        handle = RoutingReplay(model, config)
        model.__dict__["_r1mega_routing_replay"] = handle
    return handle


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) of an integer tensor over the world (int64 on the wire; gloo lacks int16)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    out = t.to(torch.int64)
    dist.all_reduce(out)
    return out
