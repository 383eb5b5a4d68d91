"""Reward configuration: plain dataclasses, nested by the pipeline into OmegaConf structured configs.

Example (YAML):

    rewards:
      timeout_s: 10.0
      num_workers: 2
      components:
        - {name: math_answer, weight: 1.0, kwargs: {answer_key: answer}}
        - {name: overlong, weight: 0.5, kwargs: {max_len: 4096, buffer: 512}}
        - {name: length_shaping, weight: 0.2, group: true}
        - {name: my_pkg.rewards:brevity, weight: 0.1}

`name` is a registry name (see `dsarl.rewards.registry.BUILTIN_REWARDS`) or a `module:attr` path.
`kwargs` go to the reward: a class is constructed once with them, a function is called with them
on every sample (`fn(sample, **kwargs)`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RewardComponentConfig:
    name: str  # registry name or "module:function"
    weight: float = 1.0  # weight of this component in "total"
    kwargs: dict = field(default_factory=dict)  # passed to the reward (constructor or each call)
    group: bool = False  # True: the function scores a whole group (list[RewardSample] -> list)
    label: Optional[str] = None  # metric/column name; defaults to `name` (set it to use one fn twice)

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class RewardConfig:
    components: list[RewardComponentConfig]  # weighted and summed into "total"
    timeout_s: float = 10.0  # per-sample, per-component limit; a group call gets timeout_s * G
    num_workers: int = 1  # Ray reward actors in the pool
    num_cpus_per_worker: float = 1.0  # Ray CPUs reserved per reward actor
