"""The learner step: GRPO-family policy update (or masked-NLL SFT) over megatron's schedules.

Every rank holds the same *global* batch (rollouts are gathered before training); each
data-parallel rank trains on its contiguous slice, in micro-batches, through
``get_forward_backward_func`` (so pipeline parallelism works). Loss weights are computed once on the
global batch (``aggregation.token_weights``), which makes loss and gradient independent of the
micro-batch count and the DP size. Log-probs come from the chunked vocab-parallel head, never from
full logits.

Positions are *label* positions: ``logp[b, t] = log p(tokens[b, t + 1] | tokens[b, : t + 1])``, so
every per-token tensor of a batch is [B, S - 1] for tokens [B, S].
"""

from __future__ import annotations

import dataclasses
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from r1mega.config.schema import RLConfig
from r1mega.models import context_parallel
from r1mega.platform.distributed import compute_device
from r1mega.rl.aggregation import aggregate, split_scale, token_weights
from r1mega.rl.batching import LearnerBatch, PackedMicroBatch, micro_batch_plan, pack_micro_batch, round_up
from r1mega.rl.distill_loss import topk_forward_kl
from r1mega.rl.kl import kl_penalty
from r1mega.rl.logprob_head import hidden_state_output, token_logprobs
from r1mega.rl.mismatch import mismatch_metrics, tis_weights
from r1mega.rl.policy_loss import clip_range, entropy_bonus, policy_loss
from r1mega.rl.routing import ROUTING_REPLAY_MODES, differing_layers, padding_choice, routing_mismatch_metrics

from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

log = logging.getLogger(__name__)

__all__ = ["LearnerBatch", "LearnerSettings", "PackedMicroBatch", "ReferencePolicy", "StepMetrics", "compute_logprobs",
           "learner_step", "pack_micro_batch", "prepare_routing_replay", "score_with_routing"]


@dataclass
class LearnerSettings:
    """What the step needs beyond the RL config."""

    micro_batch_size: int
    valid_vocab: int  # logits of padded vocabulary ids are excluded from the softmax
    # token budget per rank and micro-batch (packed only): first-fit decreasing instead of micro_batch_size
    # sequences per micro-batch (parallel.max_tokens_per_micro_batch; see rl/batching.py)
    max_tokens_per_micro_batch: Optional[int] = None
    temperature: float = 1.0  # the rollout's sampling temperature: logprobs of the sampling distribution
    chunk_size: int = 1024
    constant_norm: Optional[float] = None  # Dr.GRPO's constant normaliser (seq-mean-token-sum-norm)
    pack: bool = False  # padding-free: each micro-batch's sequences become one packed row
    skip_nonfinite: bool = True  # a NaN/Inf loss skips the optimizer step (reported, never applied)
    distill_coef: float = 0.0  # SFT: + coef * forward KL to the teacher's top-k (rl/distill_loss.py)

    @classmethod
    def from_config(cls, cfg, **overrides) -> "LearnerSettings":
        """An RL stage's settings from its (preset-resolved) ``R1Config``: micro-batches by
        ``parallel.micro_batch_size``, or packed by ``parallel.max_tokens_per_micro_batch``; log-probs of
        the rollout's sampling temperature."""
        budget = cfg.parallel.max_tokens_per_micro_batch
        values = dict(micro_batch_size=cfg.parallel.micro_batch_size, valid_vocab=cfg.model.vocab_size,
                      temperature=cfg.rollout.temperature, max_tokens_per_micro_batch=budget,
                      pack=budget is not None, skip_nonfinite=cfg.trainer.skip_nonfinite_loss)
        values.update(overrides)
        return cls(**values)


@dataclass
class StepMetrics:
    values: dict[str, float] = field(default_factory=dict)
    grad_norm: float = 0.0
    skipped: bool = False
    # which optimizer step of a rollout batch (rl.updates.learner_update): 0-based over all its updates,
    # the pass over the batch and the mini-batch within the pass
    update: int = 0
    epoch: int = 0
    mini_batch: int = 0


def _dp_slice(n: int) -> slice:
    dp = parallel_state.get_data_parallel_world_size()
    if n % dp:
        raise ValueError(f"global batch of {n} sequences does not split over dp={dp} ranks")
    per = n // dp
    rank = parallel_state.get_data_parallel_rank()
    return slice(rank * per, (rank + 1) * per)


def _plan(batch: LearnerBatch, settings: LearnerSettings, pack: bool) -> list[torch.Tensor]:
    """This DP rank's micro-batches (row indices into its slice of ``batch``)."""
    budget = settings.max_tokens_per_micro_batch
    if budget is not None and not pack:
        raise ValueError("max_tokens_per_micro_batch cuts packed micro-batches: set LearnerSettings.pack=True "
                         "(padded rows are cut by micro_batch_size)")
    return micro_batch_plan(batch, parallel_state.get_data_parallel_world_size(),
                            parallel_state.get_data_parallel_rank(), settings.micro_batch_size,
                            budget if pack else None)


def _micro_batches(batch: LearnerBatch, weights: torch.Tensor, plan: list[torch.Tensor]):
    for idx in plan:
        yield batch.rows(idx), weights[idx]


@dataclass
class _Fed:
    """What one micro-batch's forward feeds this rank, and where every fed position came from."""

    inputs: torch.Tensor  # [b, s] token ids (under CP: this rank's share of the positions)
    positions: torch.Tensor  # [b, s]
    kwargs: dict  # packed_seq_params, padding_mask
    batch: LearnerBatch  # per-token fields at the fed positions; tokens[:, 1:] are the targets
    weights: torch.Tensor  # [b, s] loss weights
    src_row: torch.Tensor  # [b, s] row of the micro-batch each position belongs to (-1: padding)
    src_pos: torch.Tensor  # [b, s] label position in that row


def _feed(gpt_model, mb: LearnerBatch, weights: torch.Tensor, pack: bool) -> _Fed:
    """Packed (one thd row) or padded rows; under context parallelism this rank's 2 chunks of every
    sequence (``models.context_parallel``), with each sequence (packed) or the row width (padded) padded
    to a multiple of 2*cp and this rank's share to a multiple of tp (sequence parallelism)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cp, rank = context_parallel.cp_size(), context_parallel.cp_rank()
    seq_multiple = 2 * cp if cp > 1 else 1
    if pack:
        packed = pack_micro_batch(mb, weights, multiple=tp * cp, seq_multiple=seq_multiple)
        fed = _Fed(packed.inputs, packed.positions, {"packed_seq_params": packed.params}, packed.batch,
                   packed.weights, packed.src_row, packed.src_pos)
        bounds = packed.params.cu_seqlens_q
    else:
        width = mb.loss_mask.size(1)
        wide = mb.widened(round_up(width, math.lcm(seq_multiple, tp * cp)))
        s = wide.loss_mask.size(1)
        weights = torch.cat([weights, weights.new_zeros(weights.size(0), s - width)], dim=1)
        pos = torch.arange(s).unsqueeze(0).expand(wide.size, s)
        rows = torch.where(pos < width, torch.arange(wide.size).unsqueeze(1), -1)
        fed = _Fed(wide.tokens[:, :-1].contiguous(), pos, {}, wide, weights, rows, pos)
        bounds = [0, s]
    # decided on the whole row: every CP rank must route with a mask, or none (the aux loss's token count)
    any_padding = bool((fed.batch.seq_ids == -1).any()) if pack else False
    if cp > 1:
        idx = context_parallel.token_index(bounds, cp, rank)
        fed = _Fed(fed.inputs[:, idx].contiguous(), fed.positions[:, idx], fed.kwargs, fed.batch.at_positions(idx),
                   fed.weights[:, idx], fed.src_row[:, idx], fed.src_pos[:, idx])
    if any_padding:
        fed.kwargs.update(_padding_mask_kwargs(gpt_model, fed.batch.seq_ids))
    return _on_device(fed, compute_device())


def _on_device(fed: _Fed, device: torch.device) -> _Fed:
    """What the forward and the loss read, on the model's device. Batches are planned and cut on the host;
    ``src_row``/``src_pos`` stay there (they place results in host-side tables)."""
    if device.type == "cpu":
        return fed
    kwargs = dict(fed.kwargs)
    if "packed_seq_params" in kwargs:
        params = kwargs["packed_seq_params"]
        kwargs["packed_seq_params"] = dataclasses.replace(
            params, cu_seqlens_q=params.cu_seqlens_q.to(device), cu_seqlens_kv=params.cu_seqlens_kv.to(device))
    if "padding_mask" in kwargs:
        kwargs["padding_mask"] = kwargs["padding_mask"].to(device)
    return _Fed(fed.inputs.to(device), fed.positions.to(device), kwargs, fed.batch.to(device),
                fed.weights.to(device), fed.src_row, fed.src_pos)


def _forward(gpt_model, pack: bool, data_iterator, model, loss_fn, routing=None, recorded=None):
    """One micro-batch forward. ``routing`` (a ``models.routing_replay.RoutingReplay``): replay the
    micro-batch's ``replay_experts`` if it has them; ``recorded`` (a list): collect this rank's own
    choices after the forward with the positions they belong to (every pipeline stage runs this
    function, so each records its layers)."""
    mb, weights = next(data_iterator)
    fed = _feed(gpt_model, mb, weights, pack)
    if routing is not None:
        if fed.batch.replay_experts is not None:
            routing.set_replay(fed.batch.replay_experts)
        elif recorded is not None:
            routing.set_record()
    hidden = model(fed.inputs, fed.positions, None, **fed.kwargs)
    if recorded is not None:
        recorded.append((*routing.recorded(*fed.inputs.shape), fed.src_row, fed.src_pos))
    return hidden, partial(loss_fn, gpt_model, fed)


def _padding_mask_kwargs(gpt_model, seq_ids: torch.Tensor) -> dict:
    """The packed row's padding (to a multiple of tp) as megatron's MoE ``padding_mask``, so it stays out
    of the aux loss: a layout-dependent amount of padding otherwise changes the loss with the layout.
    megatron scatters the mask over sequence-parallel ranks only on the first pipeline stage; later
    stages get this rank's chunk here. Under context parallelism a rank's share may hold no padding while
    another's does: it still passes its (all-False) mask, because megatron counts the aux loss's tokens
    differently with and without one."""
    pad = seq_ids == -1
    if not gpt_model.config.num_moe_experts:
        return {}
    if not parallel_state.is_pipeline_first_stage() and gpt_model.config.sequence_parallel:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pad = pad.chunk(tp, dim=1)[parallel_state.get_tensor_model_parallel_rank()].contiguous()
    return {"padding_mask": pad}


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x.detach().float() * mask).sum()


def _rl_loss(rl: RLConfig, s: LearnerSettings, scale: float, gpt_model, fed: _Fed, hidden):
    mb, weights = fed.batch, fed.weights
    targets = mb.tokens[:, 1:]
    logp, entropy = token_logprobs(gpt_model, hidden, targets, s.valid_vocab, s.temperature, s.chunk_size)
    mask = mb.loss_mask.float()
    old = mb.old_logp if mb.old_logp is not None else logp.detach()
    tis = None
    if rl.tis_cap is not None and mb.rollout_logp is not None:
        tis = tis_weights(old, mb.rollout_logp, mask, rl.tis_cap)
    eps_low, eps_high = clip_range(rl)
    adv = mb.token_advantages if mb.token_advantages is not None else mb.advantages[:, None]
    adv = adv.expand_as(logp).float()
    seq_group = context_parallel.cp_group() if context_parallel.cp_size() > 1 else None
    per_token, pmetrics = policy_loss(rl.policy_loss, logp, old, adv, mask, eps_low=eps_low, eps_high=eps_high,
                                      dual_clip_c=rl.dual_clip_c, seq_ids=mb.seq_ids, tis_weights=tis,
                                      seq_group=seq_group)
    kl = None
    if mb.ref_logp is not None:
        kl = kl_penalty(logp, mb.ref_logp, rl.kl_estimator)
        if rl.kl_coef and not rl.kl_in_reward:
            per_token = per_token + rl.kl_coef * kl
    if rl.entropy_coef:
        per_token = per_token + entropy_bonus(entropy, rl.entropy_coef)
    loss = aggregate(per_token, weights)
    n = mask.sum()
    sums = {"loss": loss.detach(), "entropy": _masked_sum(entropy, mask), "tokens": n}
    sums.update({k: v.detach().float() * n for k, v in pmetrics.items()})
    if kl is not None:
        sums["kl"] = _masked_sum(kl, mask)
    if mb.rollout_logp is not None:
        mm = mismatch_metrics(logp.detach(), mb.rollout_logp, mask, rl.tis_cap)
        sums.update({f"{k}": v.detach().float() * n for k, v in mm.items()})
    return loss * scale, _as_reduced(sums)


def _sft_loss(s: LearnerSettings, scale: float, gpt_model, fed: _Fed, hidden):
    mb, weights = fed.batch, fed.weights
    targets = mb.tokens[:, 1:]
    logp, entropy = token_logprobs(gpt_model, hidden, targets, s.valid_vocab, 1.0, s.chunk_size)
    mask = mb.loss_mask.float()
    per_token = -logp
    sums = {"entropy": _masked_sum(entropy, mask), "tokens": mask.sum()}
    if s.distill_coef:
        if mb.teacher_ids is None or mb.teacher_logp is None:
            raise ValueError("distill_coef > 0 needs LearnerBatch.teacher_ids/teacher_logp (the teacher's top-k)")
        kl = _distill_kl(s, gpt_model, hidden, mb)
        per_token = per_token + s.distill_coef * kl
        sums["nll"], sums["distill_kl"] = _masked_sum(-logp, mask), _masked_sum(kl, mask)
    loss = aggregate(per_token, weights)
    sums["loss"] = loss.detach()
    return loss * scale, _as_reduced(sums)


def _distill_kl(s: LearnerSettings, gpt_model, hidden, mb: LearnerBatch) -> torch.Tensor:
    """Student log-probs of the teacher's k ids (one chunked vocab-parallel pass per rank j), then the KL."""
    student = torch.stack([token_logprobs(gpt_model, hidden, mb.teacher_ids[..., j], s.valid_vocab, 1.0,
                                          s.chunk_size)[0] for j in range(mb.teacher_ids.size(-1))], dim=-1)
    return topk_forward_kl(student, mb.teacher_logp)


def _as_reduced(sums: dict) -> dict:
    # clone: megatron divides the returned loss in place; these are ours to sum later
    return {k: torch.as_tensor(v, dtype=torch.float64).detach().clone() for k, v in sums.items()}


def _reduce_metrics(per_micro: list[dict]) -> dict[str, float]:
    """Sum over micro-batches and all ranks; token-averaged metrics are divided by the token count.

    Only last pipeline stages report; TP ranks report identical values, so sums are divided by the
    number of reporting TP copies (tp size).
    """
    keys = sorted({k for d in per_micro for k in d}) if per_micro else []
    # one rank has nothing to agree on or sum with: two collectives per step fewer (the step's budget)
    several = dist.is_initialized() and dist.get_world_size() > 1
    if several:
        names = [None] * dist.get_world_size()
        dist.all_gather_object(names, keys)
        keys = sorted({k for ks in names for k in ks})
    vec = torch.zeros(len(keys), dtype=torch.float64)
    for d in per_micro:
        for i, k in enumerate(keys):
            if k in d:
                vec[i] += float(d[k])
    if several:
        dist.all_reduce(vec)
    vec /= parallel_state.get_tensor_model_parallel_world_size()
    totals = dict(zip(keys, vec.tolist()))
    tokens = max(totals.pop("tokens", 0.0), 1.0)
    out = {"loss": totals.pop("loss", 0.0)}
    out.update({k: v / tokens for k, v in totals.items()})
    out["tokens"] = tokens
    return out


def _logprob_loss(s: LearnerSettings, gpt_model, fed: _Fed, hidden):
    logp, _ = token_logprobs(gpt_model, hidden, fed.batch.tokens[:, 1:], s.valid_vocab, s.temperature, s.chunk_size)
    return logp.sum() * 0.0, {"logp": logp.detach().clone(), "row": fed.src_row, "pos": fed.src_pos}


@torch.no_grad()
def compute_logprobs(model_chunk, gpt_model, batch: LearnerBatch, settings: LearnerSettings) -> torch.Tensor:
    """Log-probs [B, S-1] of ``batch`` under ``gpt_model`` (forward only), on every rank.

    For old-policy log-probs (``model_chunk`` = the DDP-wrapped policy) and reference log-probs
    (``model_chunk`` = a frozen :class:`ReferencePolicy`'s model). Each DP rank scores its slice; the
    last pipeline stage's results are shared with all ranks. The model routes itself (no replay):
    see :func:`score_with_routing`.
    """
    return _score(model_chunk, gpt_model, batch, settings)[0]


@dataclass
class RoutingRecord:
    """What :func:`score_with_routing` saw of the routers (identical on every rank)."""

    own: Optional[torch.Tensor] = None  # [B, S-1, L, k] the learner's own choices (when gathered)
    differs: Optional[torch.Tensor] = None  # [B, S-1] MoE layers whose own choice differs from ``compare_to``
    num_layers: int = 0


@torch.no_grad()
def score_with_routing(model_chunk, gpt_model, batch: LearnerBatch, settings: LearnerSettings, *,
                       compare_to: Optional[torch.Tensor] = None,
                       gather_own: bool = False) -> tuple[torch.Tensor, RoutingRecord]:
    """:func:`compute_logprobs` that replays ``batch.replay_experts`` (if set) and records the routers' own
    choices: ``compare_to`` (a routing table, e.g. the engine's) gives per-position counts of differing
    layers, ``gather_own`` the whole own table on every rank (R2 replays it). Under replay "own" is each
    router's top-k of its own logits given the replayed upstream layers (one forward, no second pass).
    """
    from r1mega.models import routing_replay

    routing = routing_replay.for_model(gpt_model, gpt_model.config)
    recorded: list = []
    with routing.session():
        logp, placed = _score(model_chunk, gpt_model, batch, settings, routing=routing, recorded=recorded)
    s, L, k = batch.tokens.size(1) - 1, routing.num_moe_layers, routing.topk
    own = torch.zeros(batch.size, s, L, k, dtype=torch.long)
    filled = torch.zeros(batch.size, s, L, dtype=torch.bool)
    for (table, got, _, _), (row, pos, valid) in zip(recorded, placed):
        own[row[valid], pos[valid]] = table[valid]  # RoutingReplay.recorded builds host tables
        filled[row[valid], pos[valid]] = got[valid]
    if not routing.config.sequence_parallel and parallel_state.get_tensor_model_parallel_rank() > 0:
        filled.zero_()  # TP replicas without SP saw the same tokens: count them once
    record = RoutingRecord(num_layers=L)
    if compare_to is not None:
        record.differs = routing_replay.sum_over_ranks((differing_layers(own, compare_to) & filled).sum(-1))
    if gather_own:
        table = routing_replay.sum_over_ranks(torch.where(filled[..., None], own + 1, 0)) - 1
        fed = torch.arange(s).unsqueeze(0) < (batch.row_lengths() - 1).unsqueeze(1)  # positions every layout feeds
        if (table[fed] < 0).any():
            raise RuntimeError("routing record incomplete: some (position, layer) was routed on no rank")
        table = torch.where(table < 0, padding_choice(k).to(table.dtype), table)  # never fed (packed padding)
        record.own = table.to(torch.int16)
    return logp, record


def _placement(plan: list[torch.Tensor], start: int, m: int, src_row: torch.Tensor, src_pos: torch.Tensor):
    """Global (row, label position) of micro-batch ``m``'s fed positions, and which of them are real."""
    valid = src_row >= 0
    if plan[m].numel() == 0:  # an empty (padding-only) micro-batch
        return torch.zeros_like(src_row), src_pos, torch.zeros_like(valid)
    return plan[m][src_row.clamp(min=0)] + start, src_pos, valid


def _score(model_chunk, gpt_model, batch: LearnerBatch, settings: LearnerSettings, routing=None,
           recorded=None) -> tuple[torch.Tensor, list]:
    """Log-probs [B, S-1] on every rank, and the global placement of each micro-batch's fed positions on
    this rank (``(row, pos, valid)``, in micro-batch order) for the caller's routing records."""
    rows = _dp_slice(batch.size)
    local = batch.rows(rows)
    dummy_w = torch.zeros_like(local.loss_mask, dtype=torch.float32)
    plan = _plan(batch, settings, settings.pack)
    step = partial(_forward, gpt_model, settings.pack, loss_fn=partial(_logprob_loss, settings), routing=routing,
                   recorded=recorded)
    with hidden_state_output(gpt_model):
        outputs = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=_micro_batches(local, dummy_w, plan),
            model=[model_chunk],
            num_microbatches=len(plan),
            seq_length=batch.tokens.size(1) - 1,
            micro_batch_size=settings.micro_batch_size,
            forward_only=True,
        )
    placed = [_placement(plan, rows.start, m, fed_row, fed_pos) for m, (*_, fed_row, fed_pos) in
              enumerate(recorded or [])]
    mine = None
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        parts = [(*_placement(plan, rows.start, m, o["row"], o["pos"]), o["logp"].cpu()) for m, o in enumerate(outputs)]
        mine = tuple(torch.cat([p[i][p[2]] for p in parts]) for i in (0, 1, 3))
    everyone = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    full = torch.zeros(batch.size, batch.tokens.size(1) - 1)
    for item in everyone:
        if item is not None:
            full[item[0], item[1]] = item[2]
    return full, placed


_LOGGED_MODES: set[str] = set()


def prepare_routing_replay(tm, batch: LearnerBatch, settings: LearnerSettings, mode: str) -> dict[str, float]:
    """The old-logprob pass of ``rl.routing_replay`` (collective); returns ``routing/*`` metrics.

    ``r3``: replay the engine's choices (``batch.rollout_experts``) in this pass and in training;
    ``r2``: record the learner's own choices here and replay them in training. Both set
    ``batch.old_logp`` from this pass. ``none``: if the batch carries the engine's choices, only measure
    (``batch`` unchanged). The mismatch metrics compare the learner's own choices with the engine's.
    """
    if mode not in ROUTING_REPLAY_MODES:
        raise ValueError(f"rl.routing_replay={mode!r}: choose one of {ROUTING_REPLAY_MODES}")
    if mode == "none" and batch.rollout_experts is None:
        return {}
    if mode == "r3":
        if batch.rollout_experts is None:
            raise ValueError("rl.routing_replay=r3 needs the engine's routed experts in the batch: build the "
                             "engine with rollout.return_routed_experts=true")
        batch.replay_experts = batch.rollout_experts
    else:
        batch.replay_experts = None
    if mode not in _LOGGED_MODES:
        _LOGGED_MODES.add(mode)
        log.info("routing replay: %s (megatron-core RouterReplay; engine choices %s)", mode,
                 "present" if batch.rollout_experts is not None else "absent")
    logp, record = score_with_routing(tm.ddp, tm.module, batch, settings, compare_to=batch.rollout_experts,
                                      gather_own=mode == "r2")
    if mode != "none":
        batch.old_logp = logp
    if mode == "r2":
        batch.replay_experts = record.own
    if record.differs is None:
        return {}
    return routing_mismatch_metrics(record.differs, batch.loss_mask, record.num_layers)


class ReferencePolicy:
    """A frozen copy of the policy (same layout, no optimizer) for KL reference log-probs."""

    def __init__(self, tm):
        from r1mega.models.policy import build_policy_like

        self.module = build_policy_like(tm.stage)
        self.module.load_state_dict(tm.module.state_dict())
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def logprobs(self, batch: LearnerBatch, settings: LearnerSettings) -> torch.Tensor:
        return compute_logprobs(self.module, self.module, batch, settings)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite: its smallest and largest are (``aminmax`` propagates NaN).
    One pass and no mask the size of ``t``: ``isfinite(t).all()`` took ~1.9 ms of a demo learner step."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _grads_finite(tm) -> bool:
    """Collective: no rank's gradient buffers hold a NaN/Inf (after megatron's reduction of the grads)."""
    buffers = tm.ddp.buffers + tm.ddp.expert_parallel_buffers
    local = all(all_finite(b.grad_data) for b in buffers)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    flag = torch.tensor([0.0 if local else 1.0], device=buffers[0].grad_data.device if buffers else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def learner_step(tm, batch: LearnerBatch, settings: LearnerSettings, rl: Optional[RLConfig] = None,
                 forward_only: bool = False, force_all_reduce: bool = False) -> StepMetrics:
    """One optimizer step on ``batch`` (GRPO family if ``rl`` is given, masked-NLL SFT otherwise).

    ``force_all_reduce`` leaves full gradients on every rank (parity checks read them).
    """
    mode = "token-mean" if rl is None else rl.loss_agg_mode
    weights = token_weights(batch.loss_mask.float(), mode, settings.constant_norm)
    dp_rows = _dp_slice(batch.size)
    local, local_w = batch.rows(dp_rows), weights[dp_rows]
    plan = _plan(batch, settings, settings.pack)
    num_micro = len(plan)
    scale = split_scale(num_micro, parallel_state.get_data_parallel_world_size())
    if rl is None:
        loss_fn = partial(_sft_loss, settings, scale)
    else:
        if batch.advantages is None:
            raise ValueError("an RL step needs LearnerBatch.advantages")
        loss_fn = partial(_rl_loss, rl, settings, scale)
    gpt_model = tm.module
    if not forward_only:
        tm.ddp.zero_grad_buffer()
        tm.optimizer.zero_grad()
    routing = None
    if batch.replay_experts is not None:
        from r1mega.models import routing_replay

        routing = routing_replay.for_model(gpt_model, gpt_model.config)
    with hidden_state_output(gpt_model), (routing.session() if routing is not None else nullcontext()):
        outputs = get_forward_backward_func()(
            forward_step_func=partial(_forward, gpt_model, settings.pack, loss_fn=loss_fn, routing=routing),
            data_iterator=_micro_batches(local, local_w, plan),
            model=[tm.ddp],
            num_microbatches=num_micro,
            seq_length=batch.tokens.size(1) - 1,
            micro_batch_size=settings.micro_batch_size,
            forward_only=forward_only,
            force_all_reduce=force_all_reduce,
        )
    metrics = _reduce_metrics(outputs if parallel_state.is_pipeline_last_stage() else [])
    if forward_only:
        return StepMetrics(values=metrics)
    if settings.skip_nonfinite and not math.isfinite(metrics["loss"]):
        # every rank sees the same all-reduced loss, so all of them skip together
        return StepMetrics(values=metrics, grad_norm=float("nan"), skipped=True)
    if settings.skip_nonfinite and not _grads_finite(tm):
        # megatron only checks gradients with a loss scaler (fp16); fp32/bf16 would apply NaN/Inf
        return StepMetrics(values=metrics, grad_norm=float("nan"), skipped=True)
    success, grad_norm, _ = tm.optimizer.step()
    if success:
        tm.scheduler.step(increment=1)
    return StepMetrics(values=metrics, grad_norm=float(grad_norm or 0.0), skipped=not success)
