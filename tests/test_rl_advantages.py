"""Advantage estimators and DAPO group selection on tiny hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from r1mega.rl import (
    ADVANTAGES,
    compute_advantages,
    register_advantage,
    select_informative_groups,
    uniform_groups,
)

# Two groups with non-contiguous ids: group 7 = samples 0,2,3,5 with rewards [1, 0, 0, 0];
# group 3 = samples 1,4 with rewards [2, 4].
REWARDS = torch.tensor([1.0, 2.0, 0.0, 0.0, 4.0, 0.0])
GROUPS = torch.tensor([7, 3, 7, 7, 3, 7])


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


def test_grpo_uses_unbiased_group_std_like_verl():
    # group 7: mean 0.25, centred [.75, -.25, -.25, -.25]; unbiased var (.5625 + 3 * .0625) / 3 = .25 -> std .5
    #          -> [1.5, -.5, -.5, -.5]   (a biased std, sqrt(.1875) = .433, would give 1.732)
    # group 3: mean 3, centred [-1, 1]; unbiased var 2 / 1 -> std sqrt(2) -> [-.7071, .7071]
    adv = compute_advantages("grpo", REWARDS, GROUPS, norm_by_std=True, eps=0.0)
    s = 1 / math.sqrt(2)
    close(adv, [1.5, -s, -0.5, -0.5, s, -0.5])


def test_grpo_eps_is_added_to_std():
    adv = compute_advantages("grpo", REWARDS, GROUPS, eps=0.5)
    close(adv[0], 0.75 / (0.5 + 0.5))  # std .5 + eps .5


def test_grpo_without_std_and_drgrpo_are_mean_centred_only():
    expected = [0.75, -1.0, -0.25, -0.25, 1.0, -0.25]
    close(compute_advantages("grpo", REWARDS, GROUPS, norm_by_std=False), expected)
    close(compute_advantages("drgrpo", REWARDS, GROUPS), expected)
    close(compute_advantages("drgrpo", REWARDS, GROUPS, norm_by_std=True), expected)  # Dr.GRPO never scales


def test_rloo_subtracts_the_mean_of_the_other_samples():
    # group 7: 1 - mean(0,0,0) = 1; 0 - mean(1,0,0) = -1/3 (x3).   group 3: 2 - 4 = -2; 4 - 2 = 2
    close(compute_advantages("rloo", REWARDS, GROUPS), [1.0, -2.0, -1 / 3, -1 / 3, 2.0, -1 / 3])


def test_reinforce_pp_whitens_over_the_batch_and_ignores_groups():
    # rewards [0, 1, 2, 5]: mean 2, centred [-2, -1, 0, 3]; unbiased var (4 + 1 + 0 + 9) / 3 = 14/3
    rewards = torch.tensor([0.0, 1.0, 2.0, 5.0])
    std = math.sqrt(14 / 3)
    expected = [-2 / std, -1 / std, 0.0, 3 / std]
    close(compute_advantages("reinforce_pp", rewards, torch.tensor([0, 0, 1, 1]), eps=0.0), expected)
    close(compute_advantages("reinforce_pp", rewards, torch.tensor([0, 1, 2, 3]), eps=0.0), expected)
    close(compute_advantages("reinforce_pp", rewards, torch.tensor([0, 0, 1, 1]), norm_by_std=False),
          [-2.0, -1.0, 0.0, 3.0])


def test_reinforce_pp_baseline_centres_by_group_then_whitens_batch():
    # groups [1, 0], [3, 3], [0, 2] -> centred [.5, -.5, 0, 0, -1, 1]; batch mean 0;
    # unbiased var (.25 + .25 + 1 + 1) / 5 = .5 -> std .7071 -> [.7071, -.7071, 0, 0, -1.4142, 1.4142]
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0, 0.0, 2.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    r2 = math.sqrt(2)
    adv = compute_advantages("reinforce_pp_baseline", rewards, groups, eps=0.0)
    close(adv, [1 / r2, -1 / r2, 0.0, 0.0, -r2, r2])
    assert adv[2] == 0 and adv[3] == 0  # the uniform group is exactly 0


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_all_equal_rewards_give_exact_zero(name):
    # 0.1 * 3 / 3 != 0.1 in floating point: the estimators must not leave ~1e-17 / 1e-17 noise
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7], dtype=torch.float64)
    adv = compute_advantages(name, rewards, torch.tensor([0, 0, 0, 1, 1]))
    if name == "reinforce_pp":  # the batch has spread; only a batch of equal rewards is zero
        adv = compute_advantages(name, rewards[:3], torch.tensor([0, 0, 0]))
    assert torch.equal(adv, torch.zeros_like(adv))


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo", "reinforce_pp_baseline"])
def test_group_of_one_gets_zero(name):
    # sample 2 is alone in its group (verl's grpo would give it its raw reward; we give 0: no baseline)
    rewards = torch.tensor([1.0, 0.0, 5.0])
    adv = compute_advantages(name, rewards, torch.tensor([0, 0, 1]))
    assert adv[2] == 0 and torch.isfinite(adv).all()
    assert adv[0] > 0 > adv[1]


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_single_sample_batch_and_integer_rewards(name):
    adv = compute_advantages(name, torch.tensor([3]), torch.tensor([0]))
    assert adv.dtype == torch.get_default_dtype() and adv.tolist() == [0.0]


def test_registry_errors_and_extension():
    with pytest.raises(KeyError, match="grpo"):
        compute_advantages("nope", REWARDS, GROUPS)
    with pytest.raises(ValueError, match=r"\[N\]"):
        compute_advantages("grpo", REWARDS, GROUPS[:3])
    register_advantage("test_raw")(_raw)  # registering the same function twice is fine
    register_advantage("test_raw")(_raw)
    assert torch.equal(compute_advantages("test_raw", REWARDS, GROUPS), REWARDS)
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("grpo")(_raw)
    assert "test_raw" in ADVANTAGES


def _raw(rewards, group_ids, **_):
    return rewards


def test_uniform_groups_marks_samples():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 5.0])
    assert uniform_groups(rewards, torch.tensor([0, 0, 1, 1, 2])).tolist() == [True, True, False, False, True]
    assert uniform_groups(torch.tensor([1.0, 1.05]), torch.tensor([0, 0]), atol=0.1).tolist() == [True, True]


# Pool: 5 groups of 2: g0 [1,1] uniform, g1 [0,1], g2 [0,0] uniform, g3 [1,0], g4 [0,1].
POOL_R = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0])
POOL_G = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])


@pytest.mark.parametrize("refill", ["resample", "duplicate", "none"])
def test_selection_keeps_informative_groups_up_to_target(refill):
    idx, stats = select_informative_groups(POOL_R, POOL_G, num_groups=2, refill=refill)
    assert idx.tolist() == [2, 3, 6, 7]  # g1, g3; g4 is excess
    assert (stats.num_candidate_groups, stats.num_informative_groups, stats.num_kept_groups) == (5, 3, 2)
    assert (stats.num_excess_groups, stats.num_missing_groups, stats.num_duplicated_groups) == (1, 0, 0)
    assert stats.group_ids.tolist() == [0, 0, 1, 1]


def test_selection_resample_reports_missing_groups():
    idx, stats = select_informative_groups(POOL_R, POOL_G, num_groups=5, refill="resample")
    assert idx.tolist() == [2, 3, 6, 7, 8, 9]
    assert stats.num_missing_groups == 2 and stats.num_duplicated_groups == 0


def test_selection_duplicate_cycles_kept_groups_with_fresh_ids():
    idx, stats = select_informative_groups(POOL_R, POOL_G, num_groups=5, refill="duplicate")
    assert idx.tolist() == [2, 3, 6, 7, 8, 9, 2, 3, 6, 7]  # g1 g3 g4 then g1 g3 again
    assert stats.num_duplicated_groups == 2 and stats.num_missing_groups == 0
    assert stats.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_selection_none_trains_on_fewer_and_duplicate_of_nothing_is_empty():
    idx, stats = select_informative_groups(POOL_R, POOL_G, num_groups=5, refill="none")
    assert idx.tolist() == [2, 3, 6, 7, 8, 9] and stats.num_missing_groups == 2
    idx, stats = select_informative_groups(torch.ones(4), torch.tensor([0, 0, 1, 1]), 2, refill="duplicate")
    assert idx.numel() == 0 and stats.num_missing_groups == 2 and stats.group_ids.numel() == 0


def test_selection_handles_interleaved_ids_and_bad_arguments():
    idx, _ = select_informative_groups(torch.tensor([0.0, 1.0, 1.0, 1.0]), torch.tensor([5, 1, 5, 1]), 1)
    assert idx.tolist() == [0, 2]  # group 5 is informative, group 1 is uniform
    with pytest.raises(ValueError, match="refill"):
        select_informative_groups(POOL_R, POOL_G, 2, refill="bogus")
    with pytest.raises(ValueError, match="num_groups"):
        select_informative_groups(POOL_R, POOL_G, 0)
