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
        - {name: rewards/trl_style.py:format_reward_func, style: trl}
        - {name: my_verl_rewards.py:compute_score, failure_value: -1.0}

`name` is a registry name (see `dsarl.rewards.registry.BUILTIN_REWARDS`), a `module:attr` path or a
`file.py:attr` path. `kwargs` go to the reward: a class is constructed once with them, a function
gets them on every call. `style` says how the function is called (auto: read from its signature).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class RewardComponentConfig:
    name: str  # registry name, "module:attr" or "path/to/file.py:attr"
    weight: float = 1.0  # weight of this component in "total"
    kwargs: dict = field(default_factory=dict)  # passed to the reward (constructor or each call)
    group: bool = False  # True: the function scores a whole group (list[RewardSample] -> list)
    label: Optional[str] = None  # metric/column name; defaults to `name` (set it to use one fn twice)
    # How the function is called: "sample" fn(sample); "trl" fn(prompts, completions, **columns) once per
    # chunk (per group with group: true); "verl" fn(data_source, solution_str, ground_truth, extra_info).
    # "auto" reads the signature (see dsarl.rewards.adapters.detect_style).
    style: Literal["auto", "sample", "trl", "verl"] = "auto"
    # Value a failed call (raised, timed out, non-finite) scores. None: the reward's own `failure_value`
    # attribute, else 0.0 (built-in penalties in [-1, 0] declare -1.0, their worst).
    failure_value: Optional[float] = None

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class RewardConfig:
    components: list[RewardComponentConfig]  # weighted and summed into "total"
    timeout_s: float = 10.0  # per-sample, per-component limit; a group call gets timeout_s * G
    num_workers: int = 1  # Ray reward actors in the pool
    num_cpus_per_worker: float = 1.0  # Ray CPUs reserved per reward actor
    # A component is dead (the run stops, RewardComponentDead) when, over the last `failure_window`
    # scoring calls of the pool, its failures / samples >= max_failure_rate. The default stops the run
    # when a component fails on every sample of one batch; values above 1 never stop it.
    max_failure_rate: float = 1.0
    failure_window: int = 1
    # A reward worker lost at the Ray level (its process killed, its node gone) mid-chunk: the chunk is
    # scored again on a replacement worker up to this many times; samples still without a score then
    # are unscored (None), never given made-up values (the driver drops their groups).
    chunk_retries: int = 1
