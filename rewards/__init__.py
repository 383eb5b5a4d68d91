"""dsarl.rewards: reward functions, their registry, and the combiner (plain Python, no Ray).

Contract: a reward is `(RewardSample) -> float | dict[str, float] | None`, or for `group: true`
components `(list[RewardSample]) -> list[...]` over the G samples of one prompt; TRL- and verl-style
functions are called through `adapters`. Components are named in `RewardConfig` by registry name,
`module:attr` or `file.py:attr`; `validate_reward_config` checks a config without building anything.
`RewardCombiner` runs every call in its own child process under a hard time limit and returns
per-sample component values plus "total"; a failed call scores the component's failure value.
Ray workers: `dsarl.actors.reward_workers` (its pool raises `RewardComponentDead`).
"""
from dsarl.rewards.combiner import RewardCombiner, ScoredBatch
from dsarl.rewards.config import RewardComponentConfig, RewardConfig
from dsarl.rewards.health import RewardComponentDead
from dsarl.rewards.registry import validate_reward_config
from dsarl.rewards.rubric import JudgeEngine
from dsarl.rewards.types import RewardSample

__all__ = ["JudgeEngine", "RewardCombiner", "RewardComponentConfig", "RewardComponentDead", "RewardConfig",
           "RewardSample", "ScoredBatch", "validate_reward_config"]
