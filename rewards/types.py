"""Types that cross the reward boundary: the sample a reward function sees and the function shapes.

A reward function is any callable `(sample: RewardSample) -> float | dict[str, float] | None`. A dict
return is a set of named sub-scores; the combiner logs each as `<component>/<key>` and uses the key
`"score"` (or, when absent, the mean of the values) as the component's value. None means "no score"
for this sample (see dsarl.rewards.values). TRL- and verl-style signatures: dsarl.rewards.adapters.
A group reward function sees all G samples of one prompt at once:
`(samples: list[RewardSample]) -> list[float | dict[str, float]]`, one result per sample, in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, Union

RewardValue = Union[float, dict]


@dataclass(frozen=True)
class RewardSample:
    """One completion to score.

    prompt:        the prompt text as the policy saw it (after the chat template, if any).
    completion:    the generated text (decoded, special tokens stripped).
    num_tokens:    number of completion tokens (what the length rewards measure).
    row:           every column of the prompt's dataset row, unchanged: reference answer, tests,
                   language, rubric id, and anything the user added.
    group_id:      id of the prompt's group of G samples; group reward functions see one group.
    sample_index:  index of this sample inside its group (0..G-1).
    finish_reason: "stop" (EOS or stop string) or "length" (truncated at max tokens).
    completion_ids: the completion's token ids when the driver passes them (TRL-style rewards get
                   them as `completions_ids`), else None.
    """

    prompt: str
    completion: str
    num_tokens: int
    row: dict
    group_id: int = 0
    sample_index: int = 0
    finish_reason: str = "stop"
    completion_ids: Optional[Sequence[int]] = None


class RewardFn(Protocol):
    def __call__(self, sample: RewardSample) -> RewardValue: ...


class GroupRewardFn(Protocol):
    def __call__(self, samples: list[RewardSample]) -> list[RewardValue]: ...


AnyRewardFn = Callable[..., object]
