"""What an engine returns: one `Completion` per (prompt, sample), and the `Engine` interface.

`keep_mask` is packed: per generated token, the sorted ids the sampler kept (top-p / top-k);
`keep_mask_tensor` unpacks it to the bool [T, V] the learner's log-probabilities take. `indices` is
per generated token the indexer's selection of the query that produced that token's distribution
(query position len(prompt_ids) - 1 + t), int32 [T, L, K], -1 padded (sparse attention only).
"""
from dataclasses import dataclass
from typing import Protocol

import torch

from .sampling import SamplingParams

FINISH_REASONS = ("stop", "length")


@dataclass
class Completion:
    prompt_index: int  # position of the prompt in the generate() call (global across a pool)
    sample_index: int  # 0..n-1 within the prompt's group
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, a stop token included
    logprobs: list[float]  # per generated token, under the sampled (temperature, top-p/k) distribution
    finish_reason: str  # "stop" (eos, stop token or stop string) | "length" (max_new_tokens or max_len)
    text: str  # decoded tokens (special tokens skipped), cut before the first stop string
    weight_version: int  # the weights that generated it
    keep_mask: list[list[int]] | None = None  # per token, kept token ids (sorted)
    indices: torch.Tensor | None = None  # [T, L, K] int32


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
