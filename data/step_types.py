"""The types one GRPO step passes between its parts, in one place on the lowest floor (DESIGN.md
section 1): the engines produce `Completion`s, the reward workers score them, the driver groups them
into `GroupSample`s for the learner. `actors/` and `learner/` import these downward; nothing here
imports Ray or a model.

    Completion   one sample of one prompt, as the rollout engine produced it
    ScoredRound  one generate + score round of a step: rows, completions, scores, reward metrics
    GroupSample  one prompt's G completions with their advantages: what the learner trains on

`Completion.keep_mask` is packed: per generated token, the sorted ids the sampler kept (top-p /
top-k). `indices` is per generated token the indexer's selection of the query that produced that
token's distribution (query position len(prompt_ids) - 1 + t), [T, L, K] -1 padded (sparse attention
only), carried encoded (`PackedIndices`, data/index_codec.py: exact sets, a few bits a key) from the
engine to the learner, which decodes it when it pads the batch. `experts` is the routing of every token
the engine fed through the model: the prompt's P tokens, then each generated token but the last (the
last is sampled, never fed), so [P + T - 1, M, k] for the M MoE layers in layer order, uint8
(n_routed_experts <= 256) or int16: exact and compact.

Partial rollouts (a generation continued across a weight update): `token_versions` holds, per generated
token, the weight version that sampled it (non-decreasing along the completion), and `weight_version` is
the oldest of them, the first token's: a sample partly sampled with older weights is as stale as its
oldest token, so the staleness metric and bound read `weight_version`. `logprobs` stay per token under
the weights that sampled each token, which is what the learner's off-policy mask and truncated IS need
for a mixture of versions.
"""
from dataclasses import dataclass, field

import torch

from .index_codec import PackedIndices

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
    weight_version: int  # the weights that sampled its first (oldest) token
    keep_mask: list[list[int]] | None = None  # per token, kept token ids (sorted)
    indices: PackedIndices | None = None  # [T, L, K] selections, encoded
    experts: torch.Tensor | None = None  # [P + T - 1, M, k] uint8 | int16: routed experts per MoE layer
    token_versions: list[int] | None = None  # per token, the weight version that sampled it (None: all weight_version)

    @property
    def num_versions(self) -> int:
        """How many weight versions sampled this completion (> 1: a partial rollout)."""
        return len(set(self.token_versions)) if self.token_versions else 1


@dataclass
class ScoredRound:
    """One rollout round: `rows[p]` is prompt p's dataset row; its G completions are
    completions[p * G: (p + 1) * G] (prompt_index p) with their `scores` (one dict per completion:
    every component's value, "total", and the sub-scores of dict rewards; None for a sample no reward
    worker could score, which never enters the loss)."""

    rows: list[dict]
    completions: list[Completion]
    scores: list[dict | None]
    reward_metrics: dict[str, float] = field(default_factory=dict)
    generate_s: float = 0.0
    reward_s: float = 0.0


@dataclass
class GroupSample:
    prompt_ids: list[int]
    completions: list[list[int]]  # G completions (token ids, stop token included)
    sampler_logprobs: list[list[float]]  # per completion token, from the rollout engine
    advantages: list[float]  # per completion
    keep_masks: list[list[list[int]]] | None = None  # per completion, per token: kept token ids
    indices: list[PackedIndices | torch.Tensor] | None = None  # per completion [T, L, K]: the sampler's top-k
    weight_versions: list[int] | None = None  # per completion: the weights that sampled its oldest token
    experts: list[torch.Tensor] | None = None  # per completion [P + T - 1, M, k]: the sampler's routing
    token_versions: list[list[int] | None] | None = None  # per completion, per token: the weights that sampled it

    @property
    def group_size(self) -> int:
        return len(self.completions)

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completions)
