"""dsarl.rewards: reward functions, their registry, and the combiner (plain Python, no Ray).

Contract: a reward is `(RewardSample) -> float | dict[str, float]`, or for `group: true`
components `(list[RewardSample]) -> list[...]` over the G samples of one prompt. Components are
named in `RewardConfig` by registry name or `module:attr`; `RewardCombiner` runs them under a time
limit and returns per-sample component values plus "total". Ray workers: `dsarl.actors.reward_workers`.
"""
from dsarl.rewards.combiner import RewardCombiner
from dsarl.rewards.config import RewardComponentConfig, RewardConfig
from dsarl.rewards.rubric import JudgeEngine
from dsarl.rewards.types import RewardSample

__all__ = ["JudgeEngine", "RewardCombiner", "RewardComponentConfig", "RewardConfig", "RewardSample"]
