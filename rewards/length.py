"""Length rewards.

- `overlong_penalty` (DAPO's soft overlong punishment, arXiv:2503.14476 eq. 13), in tokens:
      L <= max_len - buffer          ->  0
      max_len - buffer < L < max_len ->  (max_len - buffer - L) / buffer      (linear, 0 .. -1)
      L >= max_len                   -> -1
- `LengthShaping` (group-level): a correct answer longer than the shortest correct answer of its
  group is penalised by its relative excess, capped at -1:
      shaping_i = -min(1, (L_i - L_min) / (scale * L_min))   if sample i is correct, else 0,
  where L_min is the group's shortest correct length. Departure from Kimi k1.5's length reward
  (arXiv:2501.12599 sec. 2.3.3): no bonus for short answers and wrong answers are left alone, so the
  shaping never makes a wrong answer outscore a right one when its weight is below the accuracy's.
"""
from __future__ import annotations

from typing import Optional

from dsarl.rewards.types import RewardSample


def overlong_penalty(sample: RewardSample, max_len: int, buffer: int) -> float:
    """Soft overlong penalty of `sample.num_tokens`; see the module docstring."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong: need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    start = max_len - buffer
    if sample.num_tokens <= start:
        return 0.0
    return max(-1.0, (start - sample.num_tokens) / buffer)


overlong_penalty.failure_value = -1.0  # a failed call scores the worst penalty, not the best (0)


def shortest_correct_shaping(lengths: list[int], correct: list[bool], scale: float = 1.0) -> list[float]:
    """The shaping formula on plain lists (lengths in tokens, one correctness flag per sample)."""
    correct_lengths = [n for n, ok in zip(lengths, correct) if ok]
    if not correct_lengths:
        return [0.0] * len(lengths)
    shortest = max(min(correct_lengths), 1)
    return [0.0 - min(1.0, (n - shortest) / (scale * shortest)) if ok else 0.0
            for n, ok in zip(lengths, correct)]


class LengthShaping:
    """Group reward: `shortest_correct_shaping` with correctness from a per-sample reward.

    correct_fn: the reward deciding correctness (registry name or `module:function`), with
    correct_kwargs; a sample is correct when that reward is >= threshold.
    """

    failure_value = -1.0  # a failed call scores the worst penalty, not the best (0)

    def __init__(self, correct_fn: str = "math_answer", correct_kwargs: Optional[dict] = None,
                 threshold: float = 1.0, scale: float = 1.0):
        from dsarl.rewards.registry import build_reward_fn  # registry imports this module

        if scale <= 0:
            raise ValueError(f"length_shaping: scale must be > 0, got {scale}")
        self.correct = build_reward_fn(correct_fn, correct_kwargs)
        self.threshold, self.scale = threshold, scale

    def __call__(self, samples: list[RewardSample]) -> list[float]:
        correct = []
        for s in samples:
            value = self.correct(s)
            value = value.get("score", 0.0) if isinstance(value, dict) else value
            correct.append(float(value) >= self.threshold)
        return shortest_correct_shaping([s.num_tokens for s in samples], correct, self.scale)
