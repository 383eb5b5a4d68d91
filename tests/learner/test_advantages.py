import math

import pytest
import torch

from dsarl.learner.advantages import group_advantages, select_informative_groups, uniform_group_mask


def test_group_advantages_mean_only_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    # group means 0.5 and 2.0
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [1.0, -1.0, 0.0, 0.0]])
    torch.testing.assert_close(group_advantages(rewards, std_normalize=False), expected, rtol=0, atol=0)


def test_group_advantages_std_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    eps = 1e-6
    # population std: row 0 sqrt((4 * 0.25) / 4) = 0.5; row 1 sqrt((1 + 1 + 0 + 0) / 4) = sqrt(0.5)
    s1 = math.sqrt(0.5)
    expected = torch.tensor(
        [
            [0.5 / (0.5 + eps), -0.5 / (0.5 + eps), -0.5 / (0.5 + eps), 0.5 / (0.5 + eps)],
            [1.0 / (s1 + eps), -1.0 / (s1 + eps), 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(group_advantages(rewards, std_normalize=True, eps=eps), expected)


def test_uniform_group_gets_zero_not_nan():
    rewards = torch.tensor([[2.0, 2.0, 2.0]])
    out = group_advantages(rewards, std_normalize=True)
    assert torch.equal(out, torch.zeros(1, 3))


def test_group_advantages_rejects_1d():
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(4), std_normalize=False)


def test_uniform_group_mask_exact():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 1e-7], [0.0, 0.0, 0.0], [-1.0, 2.0, -1.0]])
    assert uniform_group_mask(rewards).tolist() == [True, False, True, False]


def test_select_informative_groups_stops_at_target_and_keeps_order():
    cands = [
        torch.tensor([1.0, 1.0]),  # uniform
        torch.tensor([0.0, 1.0]),  # informative
        torch.tensor([0.0, 0.0, 0.0]),  # uniform
        torch.tensor([0.5, 0.0, 0.0]),  # informative
        torch.tensor([1.0, 0.0]),  # informative, beyond the target
    ]
    assert select_informative_groups(cands, target=2) == [1, 3]
    assert select_informative_groups(cands, target=10) == [1, 3, 4]
    assert select_informative_groups(cands, target=0) == []


def test_select_informative_groups_rejects_bad_input():
    with pytest.raises(ValueError, match="target"):
        select_informative_groups([torch.tensor([0.0, 1.0])], target=-1)
    with pytest.raises(ValueError, match="candidate_rewards"):
        select_informative_groups([torch.zeros(2, 2)], target=1)
