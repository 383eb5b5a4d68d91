"""Group-relative advantages for GRPO and the DAPO-style filter for uninformative groups.

Each prompt is sampled G times; the G rewards of one prompt form a group. Rewards arrive as a
[P, G] tensor (P prompts, G samples each) and advantages leave with the same shape.

Departures from the paper formula (DeepSeek-V3.2 §3.1, A_i = R_i - mean(R)):
- The default *is* the paper: group mean subtracted, no std normalisation. Dividing by the group
  std (DeepSeekMath's original GRPO) is an option, `std_normalize=True`.
- The std is the population std (divide by G, not G - 1): it is defined for any G and is the spread
  of the rewards actually observed. TRL and verl use the Bessel-corrected std; their advantages are
  ours times sqrt((G - 1) / G).
- Groups whose rewards are all equal have zero advantage everywhere and carry no policy gradient;
  `uniform_group_mask` marks them so the caller can drop them (DAPO dynamic sampling). The paper does
  not say whether it filters; the filter is the caller's choice.

Run the tests: `pytest tests/learner/test_advantages.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def group_advantages(rewards: torch.Tensor, std_normalize: bool, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages.

    Args:
        rewards: [P, G] float, one row per prompt, one column per sample.
        std_normalize: divide by (population std of the group + eps). DeepSeek-V3.2 does not.
        eps: added to the std so a uniform group gives 0, not NaN.

    Returns:
        [P, G] float32: A = r - mean_group(r), optionally / (std_group(r) + eps).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G], got shape {tuple(rewards.shape)}")
    r = rewards.float()  # fp32: advantages scale the loss, keep them out of bf16
    adv = r - r.mean(dim=1, keepdim=True)  # [P, G]
    if std_normalize:
        adv = adv / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return adv


def uniform_group_mask(rewards: torch.Tensor) -> torch.Tensor:
    """True for groups whose rewards are all exactly equal (zero advantage, no signal).

    Args:
        rewards: [P, G] float.

    Returns:
        [P] bool; True means "drop this group" (DAPO dynamic sampling).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G], got shape {tuple(rewards.shape)}")
    return rewards.amax(dim=1) == rewards.amin(dim=1)


def select_informative_groups(candidate_rewards: Sequence[torch.Tensor], target: int) -> list[int]:
    """Indices of the first `target` candidate groups whose rewards are not all equal.

    The caller samples candidate groups (more than it needs), calls this, keeps the groups at the
    returned indices and, if fewer than `target` came back, samples again for the rest. Order is
    preserved so the choice is deterministic given the candidates.

    Args:
        candidate_rewards: a sequence of 1-D reward tensors, one per candidate group ([G_i] each;
            groups may differ in size).
        target: how many informative groups the batch needs (>= 0).

    Returns:
        list[int] of at most `target` indices into `candidate_rewards`, increasing.
    """
    if target < 0:
        raise ValueError(f"target must be >= 0, got {target}")
    chosen: list[int] = []
    for i, r in enumerate(candidate_rewards):
        if len(chosen) == target:
            break
        if r.dim() != 1 or r.numel() == 0:
            raise ValueError(f"candidate_rewards[{i}] must be a non-empty 1-D tensor, got shape {tuple(r.shape)}")
        if bool(r.amax() != r.amin()):
            chosen.append(i)
    return chosen
