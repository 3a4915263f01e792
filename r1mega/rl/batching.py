"""The learner's batch type and how a data-parallel rank's share of it becomes micro-batches.

Two ways to cut micro-batches:

- **fixed count** (``micro_batch_size`` sequences each), padded rows or packed;
- **token budget** (``max_tokens_per_micro_batch``, packed): sequences go into micro-batches by
  first-fit decreasing on their token counts, so a long-tailed batch (a few 16K-token chains of
  thought among short answers) neither pads every short row to the longest nor puts several long
  sequences into one micro-batch. Every DP rank runs the same number of micro-batches (megatron's
  schedules and the gradient reduction need it): a rank with fewer gets empty ones (a padding-only
  packed row, zero loss weight).

Loss weights are computed on the global batch (``aggregation.token_weights``), so how sequences are
grouped changes neither the loss nor the gradient; only the MoE aux loss, a per-micro-batch statistic
by design, depends on the grouping.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from r1mega.rl.routing import padding_choice


@dataclass
class LearnerBatch:
    """A global batch, identical on every rank. Per-token fields are [B, S-1] (label positions)."""

    tokens: torch.Tensor  # [B, S] prompt + response, right-padded
    loss_mask: torch.Tensor  # [B, S-1] 1 where the predicted token is a response token
    advantages: Optional[torch.Tensor] = None  # [B] sequence-level (None for SFT)
    old_logp: Optional[torch.Tensor] = None  # trainer logprobs before the update (None: on-policy)
    rollout_logp: Optional[torch.Tensor] = None  # the engine's sampling logprobs (TIS, mismatch)
    ref_logp: Optional[torch.Tensor] = None  # reference policy (KL)
    lengths: Optional[torch.Tensor] = None  # [B] real tokens per row (prompt + response); None = S
    token_advantages: Optional[torch.Tensor] = None  # [B, S-1] (packed rows); overrides ``advantages``
    seq_ids: Optional[torch.Tensor] = None  # [B, S-1] sequence of each token (packed rows; -1 = padding)
    # MoE routing tables [B, S-1, L_moe, k] at input positions (rl.routing): the engine's choices, and the
    # choices every forward of this batch replays (R3: the engine's; R2: the old-logprob pass's; None: none)
    rollout_experts: Optional[torch.Tensor] = None
    replay_experts: Optional[torch.Tensor] = None
    # logit distillation (SFT with LearnerSettings.distill_coef > 0): the teacher's top-k ids and log-probs
    teacher_ids: Optional[torch.Tensor] = None  # [B, S-1, k] long
    teacher_logp: Optional[torch.Tensor] = None  # [B, S-1, k]; -inf pads positions with fewer entries

    @property
    def size(self) -> int:
        return self.tokens.size(0)

    def rows(self, idx) -> "LearnerBatch":
        """The rows ``idx`` (a slice, or a tensor/list of row indices) of every field."""
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return LearnerBatch(self.tokens[idx], self.loss_mask[idx], pick(self.advantages), pick(self.old_logp),
                            pick(self.rollout_logp), pick(self.ref_logp), pick(self.lengths),
                            pick(self.token_advantages), pick(self.seq_ids), pick(self.rollout_experts),
                            pick(self.replay_experts), pick(self.teacher_ids), pick(self.teacher_logp))

    def at_positions(self, idx: torch.Tensor) -> "LearnerBatch":
        """Only the label positions ``idx`` of every per-token field (a context-parallel rank's share).
        ``tokens`` becomes ``[B, len(idx) + 1]`` with ``tokens[:, 1:]`` the targets at ``idx`` (its
        first column is a placeholder: inputs are fed separately); ``lengths`` is dropped."""
        pick = lambda t: None if t is None else t[:, idx]  # noqa: E731
        targets = self.tokens[:, 1:][:, idx]
        tokens = torch.cat([self.tokens[:, :1], targets], dim=1)
        return LearnerBatch(tokens, self.loss_mask[:, idx], self.advantages, pick(self.old_logp),
                            pick(self.rollout_logp), pick(self.ref_logp), None, pick(self.token_advantages),
                            pick(self.seq_ids), pick(self.rollout_experts), pick(self.replay_experts),
                            pick(self.teacher_ids), pick(self.teacher_logp))

    def widened(self, positions: int) -> "LearnerBatch":
        """Right-padded to ``positions`` label positions (tokens ``positions + 1``): zeros everywhere, valid
        distinct expert ids in routing tables. The padding is never in the loss (mask 0)."""
        extra = positions - self.loss_mask.size(1)
        if extra <= 0:
            return self

        def pad(t, fill=None):
            if t is None:
                return None
            tail = torch.zeros((t.size(0), extra, *t.shape[2:]), dtype=t.dtype)
            if fill is not None:
                tail[:] = fill.to(t.dtype)
            return torch.cat([t, tail], dim=1)

        experts = lambda t: None if t is None else pad(t, padding_choice(t.size(-1)))  # noqa: E731
        return LearnerBatch(pad(self.tokens), pad(self.loss_mask), self.advantages, pad(self.old_logp),
                            pad(self.rollout_logp), pad(self.ref_logp), self.row_lengths(), pad(self.token_advantages),
                            None if self.seq_ids is None else pad(self.seq_ids, torch.tensor(-1)),
                            experts(self.rollout_experts), experts(self.replay_experts), pad(self.teacher_ids),
                            pad(self.teacher_logp))

    def to(self, device: torch.device) -> "LearnerBatch":
        """Every tensor field on ``device``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return LearnerBatch(**{k: None if t is None else t.to(device, non_blocking=True) for k, t in fields.items()})

    def row_lengths(self) -> torch.Tensor:
        """[B] real tokens per row (``lengths``, or the full width when unset)."""
        if self.lengths is not None:
            return self.lengths
        return torch.full((self.size,), self.tokens.size(1), dtype=torch.long)


# ----------------------------------------------------------------------------- planning


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def packed_spans(lengths: torch.Tensor, seq_multiple: int = 1) -> list[int]:
    """Packed tokens per sequence: its predicted positions (length - 1), rounded up to ``seq_multiple``
    (context parallelism splits every sequence into 2*cp equal chunks)."""
    return [round_up(max(int(n) - 1, 0), seq_multiple) for n in lengths]


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each summing to <= ``capacity``: items by decreasing size, each into the
    first bin it fits (ties keep index order, so the plan is deterministic). Items inside a bin are in
    index order."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        if sizes[i] > capacity:
            raise ValueError(f"item {i} of size {sizes[i]} exceeds the bin capacity {capacity}")
        for b, free in enumerate(room):
            if sizes[i] <= free:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(capacity - sizes[i])
    return [sorted(b) for b in bins]


def micro_batch_plan(batch: LearnerBatch, dp: int, dp_rank: int, micro_batch_size: int,
                     max_tokens: Optional[int] = None, cp: int = 1) -> list[torch.Tensor]:
    """Row indices (into this DP rank's contiguous slice) of each micro-batch.

    ``max_tokens`` (token budget per rank; a micro-batch holds up to ``max_tokens * cp`` tokens, cp
    ranks sharing each sequence): first-fit decreasing per DP rank, then every rank is padded with
    empty micro-batches to the largest count (the global batch is on every rank, so each rank computes
    every rank's plan: no communication). Otherwise: consecutive groups of ``micro_batch_size`` rows.
    """
    if batch.size % dp:
        raise ValueError(f"global batch of {batch.size} sequences does not split over dp={dp} ranks")
    per = batch.size // dp
    if max_tokens is None:
        if per % micro_batch_size:
            raise ValueError(f"local batch of {per} sequences is not divisible by micro_batch_size={micro_batch_size}")
        return [torch.arange(s, s + micro_batch_size) for s in range(0, per, micro_batch_size)]
    seq_multiple = 2 * cp if cp > 1 else 1
    spans = packed_spans(batch.row_lengths(), seq_multiple)
    if spans and max(spans) > max_tokens * cp:
        raise ValueError(f"a sequence of {max(spans)} packed tokens does not fit a micro-batch of max_tokens_per_micro_"
                         f"batch={max_tokens} tokens per rank x cp={cp}: raise parallel.max_tokens_per_micro_batch "
                         f"to at least {-(-max(spans) // cp)} (the longest prompt + response, over cp)")
    plans = [first_fit_decreasing(spans[r * per: (r + 1) * per], max_tokens * cp) for r in range(dp)]
    count = max(len(p) for p in plans)
    mine = plans[dp_rank] + [[]] * (count - len(plans[dp_rank]))
    return [torch.tensor(b, dtype=torch.long) for b in mine]


# ----------------------------------------------------------------------------- packing


@dataclass
class PackedMicroBatch:
    inputs: torch.Tensor  # [1, T] input ids of all sequences back to back (+ padding to a multiple of tp)
    positions: torch.Tensor  # [1, T] restart at 0 for every sequence
    params: object  # megatron PackedSeqParams (thd, cu_seqlens)
    batch: LearnerBatch  # the same data as one packed row: tokens [1, T+1], per-token fields [1, T]
    weights: torch.Tensor  # [1, T]
    src_row: torch.Tensor  # [1, T] row of the unpacked micro-batch each token came from (-1: padding)
    src_pos: torch.Tensor  # [1, T] its position in that row


def pack_micro_batch(mb: LearnerBatch, weights: torch.Tensor, multiple: int = 1,
                     seq_multiple: int = 1) -> PackedMicroBatch:
    """Concatenate the rows' real tokens (no padding between sequences) for megatron's thd format.

    ``seq_multiple``: each sequence's segment is padded to a multiple of it (context parallelism needs
    2*cp); ``multiple``: the whole row is padded to a multiple of lcm(multiple, seq_multiple), the
    padding forming its own segment. Padding tokens have ``seq_ids == -1`` and zero loss weight.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = mb.row_lengths()
    spans = [max(int(n) - 1, 0) for n in lengths]  # predicted positions per sequence
    segments = [round_up(n, seq_multiple) for n in spans]
    per_token = {"loss_mask": mb.loss_mask, "old_logp": mb.old_logp, "rollout_logp": mb.rollout_logp,
                 "ref_logp": mb.ref_logp, "teacher_ids": mb.teacher_ids, "teacher_logp": mb.teacher_logp}
    total = sum(segments)
    padded = round_up(max(total, 1), math.lcm(multiple, seq_multiple))
    inputs = torch.zeros(padded, dtype=mb.tokens.dtype)
    labels = torch.zeros(padded, dtype=mb.tokens.dtype)
    positions = torch.zeros(padded, dtype=torch.long)
    fields = {k: None if v is None else torch.zeros((padded, *v.shape[2:]), dtype=v.dtype)
              for k, v in per_token.items()}
    packed_w = torch.zeros(padded, dtype=weights.dtype)
    adv = torch.zeros(padded) if mb.advantages is not None else None
    seq_ids = torch.full((padded,), -1, dtype=torch.long)
    src_pos = torch.zeros(padded, dtype=torch.long)
    replay = None
    if mb.replay_experts is not None:  # padding keeps valid, distinct ids (rl.routing.padding_choice)
        k = mb.replay_experts.size(-1)
        replay = padding_choice(k).expand(padded, mb.replay_experts.size(2), k).clone()
    cu, start = [0], 0
    for row, (n, seg) in enumerate(zip(spans, segments)):
        sl = slice(start, start + n)
        inputs[sl], labels[sl] = mb.tokens[row, :n], mb.tokens[row, 1: n + 1]
        if replay is not None:
            replay[sl] = mb.replay_experts[row, :n]
        positions[start: start + seg] = torch.arange(seg)
        src_pos[sl] = torch.arange(n)
        for k, v in per_token.items():
            if v is not None:
                fields[k][sl] = v[row, :n]
        packed_w[sl] = weights[row, :n]
        if adv is not None:
            adv[sl] = mb.advantages[row]
        seq_ids[sl] = row
        start += seg
        cu.append(start)
    if padded > total:  # the padding forms its own segment, masked out of the loss
        cu.append(padded)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                             max_seqlen_q=max_len, max_seqlen_kv=max_len)
    tokens = torch.cat([inputs, labels[-1:]])  # tokens[1:] must equal labels: shift by one
    tokens[1:] = labels
    row = lambda t: None if t is None else t.unsqueeze(0)  # noqa: E731
    batch = LearnerBatch(tokens.unsqueeze(0), fields["loss_mask"].unsqueeze(0),
                         advantages=None if adv is None else torch.zeros(1), token_advantages=row(adv),
                         old_logp=row(fields["old_logp"]), rollout_logp=row(fields["rollout_logp"]),
                         ref_logp=row(fields["ref_logp"]), seq_ids=seq_ids.unsqueeze(0), replay_experts=row(replay),
                         teacher_ids=row(fields["teacher_ids"]), teacher_logp=row(fields["teacher_logp"]))
    return PackedMicroBatch(inputs.unsqueeze(0), positions.unsqueeze(0), params, batch, packed_w.unsqueeze(0),
                            seq_ids.unsqueeze(0), src_pos.unsqueeze(0))
