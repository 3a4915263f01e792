"""Token-balanced assignment of a global batch's samples to the learner's data-parallel ranks.

Why: the learner gives DP rank r the r-th contiguous slice of the global batch. Rollouts arrive in
prompt order with long-tailed response lengths, so contiguous slices carry very different token
counts and every rank waits for the one with the most. Here the samples are partitioned so that the
largest per-rank token count is as small as possible, with the same number of samples on every rank
(megatron's pipeline schedule needs the same micro-batch count on every DP rank), and the batch is
reordered so that rank r's contiguous slice is its part. The loss weights are computed over the
global batch, so the reorder changes neither loss nor gradient.

The partition is the largest differencing method (Karmarkar-Karp, k-way; with equal part sizes as
in verl's ``get_seqlen_balanced_partitions``), then a depth-first branch and bound that starts from
it and proves it optimal or improves it, within a fixed node budget. Small inputs are solved exactly;
large ones keep the best partition found (differencing alone is already within a few tokens there).
Everything is deterministic: every rank computes the same partition from the same counts.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from r1mega.rl.learner import LearnerBatch

# Placements the exact search may try after differencing (at most about half a second of Python), and
# how close to the lower bound (relative) is close enough to stop: 1e-4 keeps inputs below 10k tokens
# per part exact and stops a large batch a few tokens from perfect.
SEARCH_NODES = 20_000
SEARCH_TOLERANCE = 1e-4


def balanced_partition(token_counts: Sequence[int], parts: int, equal_size: bool = True,
                       groups: Optional[Sequence[Hashable]] = None) -> list[list[int]]:
    """Indices of ``token_counts`` per part (each ascending), minimising the largest part's token sum.

    ``equal_size``: every part gets len / parts samples (what DP ranks need); otherwise parts may
    differ in size but none is empty. ``groups`` (e.g. GRPO group ids, one per sample): samples of a
    group stay in one part; ``None`` lets samples move freely, which balances finer (advantages are
    computed over whole groups before the samples are redistributed, so the learner does not need
    groups together).
    """
    counts = _check_counts(token_counts, parts)
    units = _units(len(counts), groups)
    weights = [sum(counts[i] for i in unit) for unit in units]
    cap = len(units)
    if equal_size:
        sizes = {len(unit) for unit in units}
        if len(sizes) > 1:
            raise ValueError(f"equal_size partition needs groups of one size, got sizes {sorted(sizes)}: "
                             "pass groups=None to move samples one by one")
        if len(units) % parts:
            what = "groups" if groups is not None else "samples"
            raise ValueError(f"{len(units)} {what} do not split into {parts} equal parts: make the global batch "
                             f"a multiple of {parts} {what} (one share per data-parallel rank)")
        cap = len(units) // parts
    elif len(units) < parts:
        raise ValueError(f"{len(units)} units cannot fill {parts} non-empty parts")
    assign = _differencing(weights, parts, equal_size)
    assign = _search(weights, parts, cap, assign)
    out: list[list[int]] = [[] for _ in range(parts)]
    for unit, part in zip(units, assign):
        out[part].extend(unit)
    return [sorted(p) for p in out]


def imbalance(token_counts: Sequence[int], partition: Sequence[Sequence[int]]) -> float:
    """Largest part's token sum over the mean part's (1.0 = perfect; what ``batch/dp_token_imbalance`` logs)."""
    sums = [sum(token_counts[i] for i in part) for part in partition]
    mean = sum(sums) / len(sums)
    return max(sums) / mean if mean > 0 else 1.0


def contiguous_partition(n: int, parts: int) -> list[list[int]]:
    """The learner's default split: part r is the r-th contiguous slice (``learner._dp_slice``)."""
    if parts < 1 or n % parts:
        raise ValueError(f"{n} samples do not split into {parts} equal contiguous parts")
    per = n // parts
    return [list(range(r * per, (r + 1) * per)) for r in range(parts)]


def dp_permutation(partition: Sequence[Sequence[int]]) -> list[int]:
    """The order that makes part r the r-th contiguous slice: new row j is old row ``order[j]``."""
    sizes = {len(p) for p in partition}
    if len(sizes) != 1:
        raise ValueError(f"parts have sizes {sorted(sizes)}: the learner slices DP ranks contiguously and "
                         "needs equal parts (balanced_partition(..., equal_size=True))")
    order = [i for part in partition for i in part]
    if sorted(order) != list(range(len(order))):
        raise ValueError("partition is not a partition of 0..n-1 (an index is missing or repeated)")
    return order


def inverse_permutation(order: Sequence[int]) -> list[int]:
    """``inv[order[j]] = j``: maps per-row results of the reordered batch back to the original rows."""
    inv = [0] * len(order)
    for j, i in enumerate(order):
        inv[i] = j
    return inv


@dataclass
class DPBalance:
    """What :func:`balance_batch` did: the row order and both splits' imbalance (max over mean)."""

    order: list[int]
    partition: list[list[int]]
    imbalance: float  # of the balanced split (``batch/dp_token_imbalance``)
    contiguous_imbalance: float  # of the split without reordering, for comparison


def sample_tokens(batch: "LearnerBatch") -> list[int]:
    """Real tokens per row (prompt + response): ``lengths``, or the full width when rows are unpadded."""
    if batch.lengths is not None:
        return [int(n) for n in batch.lengths.tolist()]
    return [batch.tokens.size(1)] * batch.size


def balance_batch(batch: "LearnerBatch", dp: int,
                  groups: Optional[Sequence[Hashable]] = None) -> tuple["LearnerBatch", DPBalance]:
    """``batch`` reordered so that DP rank r's contiguous slice is its token-balanced part."""
    tokens = sample_tokens(batch)
    partition = balanced_partition(tokens, dp, equal_size=True, groups=groups)
    order = dp_permutation(partition)
    plan = DPBalance(order, partition, imbalance(tokens, partition),
                     imbalance(tokens, contiguous_partition(len(tokens), dp)))
    return batch.rows(torch.tensor(order, dtype=torch.long)), plan


# ----------------------------------------------------------------------------- the partition


def _check_counts(token_counts: Sequence[int], parts: int) -> list[int]:
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts={parts!r} must be a positive integer (the data-parallel size)")
    counts = []
    for i, c in enumerate(token_counts):
        if isinstance(c, torch.Tensor):
            c = c.item()
        if isinstance(c, bool) or int(c) != c or c < 0:
            raise ValueError(f"token_counts[{i}]={c!r}: token counts must be non-negative integers")
        counts.append(int(c))
    if len(counts) < parts:
        raise ValueError(f"{len(counts)} samples cannot give each of {parts} parts one")
    return counts


def _units(n: int, groups: Optional[Sequence[Hashable]]) -> list[list[int]]:
    """Sample indices per unit: one sample each, or one group each (in order of first appearance)."""
    if groups is None:
        return [[i] for i in range(n)]
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} ids for {n} samples: give one group id per sample")
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    return list(members.values())


def _differencing(weights: list[int], parts: int, equal_size: bool) -> list[int]:
    """Largest differencing: repeatedly merge the two partial partitions with the largest spread,
    heaviest subset with lightest. Equal sizes: start from ``parts``-tuples of neighbours in sorted
    order, so every merge keeps the subsets equally sized. Returns the part of each unit."""
    ranked = sorted(range(len(weights)), key=lambda u: (weights[u], u))
    if equal_size:
        starts = [ranked[i: i + parts] for i in range(0, len(ranked), parts)]
    else:
        starts = [[u] for u in ranked]
    tie = itertools.count()
    heap = []
    for members in starts:
        subsets = [(weights[u], [u]) for u in members] + [(0, [])] * (parts - len(members))
        heap.append(_entry(subsets, next(tie)))
    heapq.heapify(heap)
    while len(heap) > 1:
        a, b = heapq.heappop(heap)[-1], heapq.heappop(heap)[-1]
        merged = [(sa + sb, ua + ub) for (sa, ua), (sb, ub) in zip(a, reversed(b))]
        heapq.heappush(heap, _entry(merged, next(tie)))
    assign = [0] * len(weights)
    for part, (_, members) in enumerate(heap[0][-1]):
        for u in members:
            assign[u] = part
    return assign


def _entry(subsets: list, tie: int) -> tuple:
    subsets = sorted(subsets, key=lambda s: s[0], reverse=True)
    return (-(subsets[0][0] - subsets[-1][0]), -subsets[0][0], tie, subsets)


def _search(weights: list[int], parts: int, cap: int, start: list[int]) -> list[int]:
    """Depth-first branch and bound over unit placements (heaviest first), seeded with ``start``.

    Prunes a placement that cannot beat the best maximum found, symmetric placements (two parts with
    the same sum and size), and partial states whose parts must still take at least their lightest
    remaining units (``cap``: units per part). Stops within ``SEARCH_TOLERANCE`` of the lower bound or
    after ``SEARCH_NODES`` placements.
    """
    m = len(weights)
    order = sorted(range(m), key=lambda u: (-weights[u], u))
    w = [weights[u] for u in order]
    lightest = [0] * (m + 1)  # lightest[r]: sum of the r lightest units
    for r in range(1, m + 1):
        lightest[r] = lightest[r - 1] + w[m - r]
    sums0 = [0] * parts
    for u, p in enumerate(start):
        sums0[p] += weights[u]
    equal = cap * parts == m
    valid = equal or len(set(start)) == parts  # differencing may leave a part empty when sizes are free
    best, best_assign = (max(sums0) if valid else float("inf")), [start[u] for u in order]
    bound = -(-sum(w) // parts)
    if equal:
        bound = max(bound, w[0] + lightest[cap - 1])
    else:
        bound = max(bound, w[0])
        cap = m - parts + 1  # every other part keeps at least one unit
    good_enough = bound + int(bound * SEARCH_TOLERANCE)
    if best <= good_enough:
        return start

    sums, counts, placed = [0] * parts, [0] * parts, [-1] * m
    options: list[list[int]] = [[] for _ in range(m)]
    next_option = [0] * m

    def choices(i: int) -> list[int]:
        empty = sum(1 for c in counts if c == 0)
        must_fill = empty >= m - i  # the remaining units are needed for the empty parts
        seen, out = set(), []
        for p in sorted(range(parts), key=lambda q: (sums[q], counts[q], q)):
            if counts[p] >= cap or (must_fill and counts[p]):
                continue
            if sums[p] + w[i] >= best:
                break  # parts come lightest first: the rest cannot do better either
            if (sums[p], counts[p]) not in seen:
                seen.add((sums[p], counts[p]))
                out.append(p)
        return out

    def feasible() -> bool:
        if not equal:
            return True
        return all(sums[p] + lightest[cap - counts[p]] < best for p in range(parts))

    level, nodes = 0, 0
    options[0] = choices(0)
    while level >= 0 and nodes < SEARCH_NODES:
        p = placed[level]
        if p >= 0:
            sums[p] -= w[level]
            counts[p] -= 1
            placed[level] = -1
        if next_option[level] == len(options[level]):
            level -= 1
            continue
        p = options[level][next_option[level]]
        next_option[level] += 1
        if sums[p] + w[level] >= best:
            continue
        sums[p] += w[level]
        counts[p] += 1
        placed[level] = p
        nodes += 1
        if level + 1 == m:
            best, best_assign = max(sums), list(placed)
            if best <= good_enough:
                break
            continue
        if feasible():
            level += 1
            options[level], next_option[level], placed[level] = choices(level), 0, -1
    assign = [0] * m
    for rank, u in enumerate(order):
        assign[u] = best_assign[rank]
    return assign
