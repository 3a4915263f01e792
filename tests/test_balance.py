"""Token-balanced DP partition (rl.balance): exact on small inputs, balanced on long-tailed batches, and
invisible to training: the learner step on the reordered batch at dp2 gives the same loss and gradients
as one process on the original order."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from r1mega.rl.balance import (
    balance_batch,
    balanced_partition,
    contiguous_partition,
    dp_permutation,
    imbalance,
    inverse_permutation,
)


def _max_part(counts, partition) -> int:
    return max(sum(counts[i] for i in part) for part in partition)


def _brute_force(counts, parts, equal_size) -> int:
    """Smallest possible largest part over every assignment (equal sizes or no empty part)."""
    n, best = len(counts), None
    for assign in itertools.product(range(parts), repeat=n):
        sizes = [assign.count(p) for p in range(parts)]
        if (equal_size and len(set(sizes)) > 1) or min(sizes) == 0:
            continue
        sums = [0] * parts
        for i, p in enumerate(assign):
            sums[p] += counts[i]
        best = max(sums) if best is None else min(best, max(sums))
    return best


def _check_is_partition(partition, n, parts, equal_size=True):
    assert len(partition) == parts
    assert sorted(i for part in partition for i in part) == list(range(n))
    assert all(part == sorted(part) and part for part in partition)
    if equal_size:
        assert {len(part) for part in partition} == {n // parts}


@pytest.mark.parametrize("parts,n,equal_size", [(2, 10, True), (3, 9, True), (4, 8, True), (2, 9, False),
                                                (3, 8, False)])
def test_small_cases_are_solved_exactly(parts, n, equal_size):
    rng = random.Random(parts * 100 + n)
    for _ in range(12):
        counts = [rng.choice([rng.randint(1, 20), rng.randint(50, 400)]) for _ in range(n)]
        partition = balanced_partition(counts, parts, equal_size=equal_size)
        _check_is_partition(partition, n, parts, equal_size)
        assert _max_part(counts, partition) == _brute_force(counts, parts, equal_size), counts


def test_search_finds_what_differencing_alone_misses():
    # differencing pairs 8-7 and 6-5 first and ends at 16 | 14; the optimum is {4, 5, 6} | {7, 8} = 15 | 15
    partition = balanced_partition([4, 5, 6, 7, 8], 2, equal_size=False)
    assert sorted(partition) == [[0, 1, 2], [3, 4]]
    # equal sizes: 2 x 3 of [1, 1, 1, 1, 1, 10] can only put 10 with two ones
    assert _max_part([1, 1, 1, 1, 1, 10], balanced_partition([1, 1, 1, 1, 1, 10], 2)) == 12


def test_partition_is_deterministic_and_independent_of_the_input_container():
    rng = random.Random(3)
    counts = [int(rng.lognormvariate(6, 1)) for _ in range(64)]
    first = balanced_partition(counts, 4)
    assert balanced_partition(list(counts), 4) == first
    assert balanced_partition(torch.tensor(counts), 4) == first
    assert balanced_partition(tuple(counts), 4) == first


@pytest.mark.parametrize("dp", [4, 6, 8])
def test_long_tailed_batch_is_balanced_where_a_contiguous_split_is_not(dp):
    gen = torch.Generator().manual_seed(dp)
    # 64-token prompts, responses with lognormal lengths (median ~400 tokens) truncated at max_new_tokens 4096
    responses = torch.empty(256).log_normal_(6.0, 1.0, generator=gen).clamp(max=4096)
    counts = (64 + responses).long().tolist()[: 256 // dp * dp]
    balanced = balanced_partition(counts, dp)
    _check_is_partition(balanced, len(counts), dp)
    got, contiguous = imbalance(counts, balanced), imbalance(counts, contiguous_partition(len(counts), dp))
    print(f"dp={dp}: dp_token_imbalance balanced={got:.4f} contiguous={contiguous:.4f}")
    assert got <= 1.05
    assert contiguous > 1.1 and contiguous - 1 > 5 * (got - 1)


def test_groups_stay_together_on_one_part():
    rng = random.Random(5)
    group_size, num_groups, parts = 4, 12, 3
    counts = [int(rng.lognormvariate(5, 1)) + 1 for _ in range(group_size * num_groups)]
    groups = [f"prompt{i // group_size}" for i in range(len(counts))]
    partition = balanced_partition(counts, parts, groups=groups)
    _check_is_partition(partition, len(counts), parts)
    for part in partition:
        ids = {groups[i] for i in part}
        assert sum(1 for g in groups if g in ids) == len(part)  # whole groups only
    per_group = [sum(counts[i: i + group_size]) for i in range(0, len(counts), group_size)]
    grouped = [[i // group_size for i in part][::group_size] for part in partition]
    assert _max_part(per_group, grouped) == _max_part(counts, partition)
    # free samples balance at least as well as whole groups
    assert _max_part(counts, balanced_partition(counts, parts)) <= _max_part(counts, partition)


@pytest.mark.parametrize("kwargs,phrase", [
    (dict(token_counts=[1] * 10, parts=4), "10 samples do not split into 4 equal parts"),
    (dict(token_counts=[1] * 3, parts=4, equal_size=False), "3 samples cannot give each of 4 parts one"),
    (dict(token_counts=[1, 2], parts=0), "parts=0 must be a positive integer"),
    (dict(token_counts=[1, -2], parts=2), r"token_counts\[1\]=-2"),
    (dict(token_counts=[1, 2.5], parts=2), r"token_counts\[1\]=2.5"),
    (dict(token_counts=[1] * 6, parts=2, groups=[0, 0, 1, 1, 1, 2]), r"groups of one size, got sizes \[1, 2, 3\]"),
    (dict(token_counts=[1] * 6, parts=2, groups=[0, 0, 1, 1, 2, 2]), "3 groups do not split into 2 equal parts"),
    (dict(token_counts=[1] * 6, parts=2, groups=[0, 1]), "groups has 2 ids for 6 samples"),
])
def test_bad_input_is_refused_with_the_fix(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        balanced_partition(**kwargs)


def test_permutation_puts_each_part_in_its_contiguous_slice():
    partition = [[1, 4], [0, 5], [2, 3]]
    order = dp_permutation(partition)
    assert order == [1, 4, 0, 5, 2, 3]
    per = len(order) // len(partition)
    assert [order[r * per: (r + 1) * per] for r in range(3)] == partition
    inv = inverse_permutation(order)
    assert [order[inv[i]] for i in range(6)] == list(range(6))
    with pytest.raises(ValueError, match="needs equal parts"):
        dp_permutation([[0, 1, 2], [3]])
    with pytest.raises(ValueError, match="not a partition"):
        dp_permutation([[0, 1], [1, 2]])
    assert contiguous_partition(6, 3) == [[0, 1], [2, 3], [4, 5]]


def test_balance_batch_moves_every_field_with_its_row():
    from r1mega.platform.megatron_compat import ensure_megatron

    ensure_megatron()
    from r1mega.rl.learner import LearnerBatch

    gen = torch.Generator().manual_seed(0)
    b, s = 8, 12
    lengths = torch.tensor([12, 11, 10, 9, 3, 4, 5, 6])
    batch = LearnerBatch(torch.randint(0, 100, (b, s), generator=gen), torch.rand(b, s - 1, generator=gen),
                         advantages=torch.randn(b, generator=gen), old_logp=torch.randn(b, s - 1, generator=gen),
                         rollout_logp=torch.randn(b, s - 1, generator=gen),
                         ref_logp=torch.randn(b, s - 1, generator=gen),
                         lengths=lengths, rollout_experts=torch.randint(0, 8, (b, s - 1, 2, 2), generator=gen))
    moved, plan = balance_batch(batch, 2)
    assert plan.order != list(range(b)) and sorted(plan.order) == list(range(b))
    idx = torch.tensor(plan.order)
    for name in ("tokens", "loss_mask", "advantages", "old_logp", "rollout_logp", "ref_logp", "lengths",
                 "rollout_experts"):
        assert torch.equal(getattr(moved, name), getattr(batch, name)[idx]), name
    assert moved.token_advantages is None and moved.teacher_ids is None
    # the contiguous halves held 42 | 18 tokens, the reordered ones hold 30 | 30
    assert [int(moved.lengths[:4].sum()), int(moved.lengths[4:].sum())] == [30, 30]
    assert plan.imbalance == 1.0 and plan.contiguous_imbalance == pytest.approx(42 / 30)


TIMEOUT_S = 240


@pytest.mark.timeout(600)
def test_learner_step_on_the_balanced_order_matches_one_process_on_the_original():
    from r1mega.config.schema import ModelConfig, RLConfig
    from r1mega.train.parallel_check import CheckSpec, Layout, compare, learner_batch, run_layout

    # aux-loss-free: megatron's MoE aux loss is a per-micro-batch statistic, so regrouping rows changes it
    model = ModelConfig(preset="qwen3_moe", moe_aux_loss_coeff=0.0)
    rl = RLConfig(loss_agg_mode="seq-mean-token-mean", kl_coef=0.01, entropy_coef=0.01, tis_cap=2.0)

    def spec(parts):
        return CheckSpec(model=model, objective="grpo", rl=rl, global_batch=8, micro_batch_size=2, steps=2,
                         pack=True, balance_parts=parts)

    tokens = torch.zeros(8, spec(2).seq_length + 1, dtype=torch.long)
    for step in range(2):  # the reorder is not the identity, and it balances the two halves
        _, plan = balance_batch(learner_batch(spec(2), tokens, step), 2)
        assert plan.order != list(range(8)) and plan.imbalance < plan.contiguous_imbalance
    reference = run_layout(spec(0), Layout(), TIMEOUT_S)
    loss_err, grad_err, param_err = compare(reference, run_layout(spec(2), Layout.parse("dp2"), TIMEOUT_S))
    assert max(loss_err, grad_err) < 1e-5, f"loss {loss_err:.2e} grad {grad_err:.2e}"
    assert param_err < 1e-3, f"param {param_err:.2e}"
