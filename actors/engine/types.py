"""The `Engine` interface. An engine returns one `Completion` (defined in dsarl.data.step_types) per
(prompt, sample); `keep_mask_tensor` unpacks a completion's packed keep mask to the bool [T, V] the
learner's log-probabilities take.
"""
from typing import Protocol

import torch

from dsarl.data.step_types import FINISH_REASONS, Completion  # noqa: F401  (the one home of the type)

from .sampling import SamplingParams


class Engine(Protocol):
    weight_version: int

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 prompt_indices: list[int] | None = None) -> list[Completion]: ...

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None: ...


def keep_mask_tensor(keep_mask: list[list[int]], vocab_size: int) -> torch.Tensor:
    """Packed kept ids per token -> bool [T, V]."""
    out = torch.zeros(len(keep_mask), vocab_size, dtype=torch.bool)
    for t, ids in enumerate(keep_mask):
        out[t, ids] = True
    return out
