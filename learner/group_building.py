"""From scored rollout rounds to the learner's batch: DAPO dynamic sampling and group advantages.

    groups, info = build_groups(rounds, group_size=G, target=P, std_normalize=False, filter_uniform=True)

A step samples `target` prompts (round 0); with `filter_uniform`, groups whose G rewards are all equal
(no signal) are dropped and the driver may sample further rounds until `enough_informative` says the
batch is full. The first `target` informative groups, in round order, are kept (so the choice is
deterministic given the rounds); without the filter the first `target` groups are. A group with an
unscored sample (score None: its reward worker was lost, actors/reward_workers.py) is never kept: it is
counted in groups/dropped_unscored and, with the filter, further rounds may replace it. Advantages are
group-relative (learner/advantages.py), computed from each group's own rewards. The sampler's MoE routing
passes through whenever the engine recorded it (it does only when the driver asks: return_experts).
Each completion's weight version (its oldest token's, with partial rollouts) and per-token versions pass
through to the group.
"""
import math
from dataclasses import replace

import torch

from dsarl.data.step_types import Completion, GroupSample, ScoredRound

from .advantages import group_advantages, select_informative_groups


def round_rewards(rnd: ScoredRound, group_size: int) -> torch.Tensor:
    """[P, G] float64 totals of one round (float64: rewards are combined in it; advantages cast later);
    NaN for an unscored sample (score None: its reward worker was lost on every try)."""
    totals = torch.tensor([math.nan if s is None else s["total"] for s in rnd.scores], dtype=torch.float64)
    if totals.numel() != len(rnd.rows) * group_size:
        raise ValueError(f"round has {totals.numel()} scores for {len(rnd.rows)} prompts x {group_size} samples")
    return totals.view(len(rnd.rows), group_size)


def _candidates(rounds: list[ScoredRound], group_size: int) -> list[torch.Tensor]:
    return [r for rnd in rounds for r in round_rewards(rnd, group_size)]


def _fully_scored(candidates: list[torch.Tensor]) -> list[int]:
    """Indices of the groups every sample of which has a score: a group with an unscored sample has no
    baseline to compute its advantages from, and a made-up score would train on noise."""
    return [p for p, r in enumerate(candidates) if not bool(r.isnan().any())]


def _choose(candidates: list[torch.Tensor], target: int, filter_uniform: bool) -> list[int]:
    """The first `target` fully scored groups (informative ones only, with the filter), in round order."""
    scored = _fully_scored(candidates)
    if not filter_uniform:
        return scored[:target]
    return [scored[i] for i in select_informative_groups([candidates[p] for p in scored], target)]


def enough_informative(rounds: list[ScoredRound], group_size: int, target: int) -> bool:
    """True when the rounds hold at least `target` fully scored groups with unequal rewards."""
    return len(_choose(_candidates(rounds, group_size), target, True)) >= target


def flatten_rounds(rounds: list[ScoredRound]) -> tuple[list[dict], list[Completion], list[dict]]:
    """(rows, completions, scores) of all rounds as one list each; a later round's prompt_index is
    offset by the rows before it (the completions are copied, not changed)."""
    rows, comps, scores, offset = [], [], [], 0
    for rnd in rounds:
        rows += rnd.rows
        comps += [replace(c, prompt_index=c.prompt_index + offset) if offset else c for c in rnd.completions]
        scores += rnd.scores
        offset += len(rnd.rows)
    return rows, comps, scores


def build_groups(rounds: list[ScoredRound], group_size: int, target: int, std_normalize: bool,
                 filter_uniform: bool, record_keep: bool = False,
                 record_indices: bool = False) -> tuple[list[GroupSample], dict[str, float]]:
    """The learner's groups from the rounds, and {"groups/kept", "groups/uniform", "groups/dropped_unscored",
    "reward/mean"} (uniform and the mean over the scored samples only)."""
    candidates = _candidates(rounds, group_size)
    chosen = _choose(candidates, target, filter_uniform)
    _, comps, _ = flatten_rounds(rounds)
    groups = []
    for p in chosen:
        adv = group_advantages(candidates[p][None], std_normalize)[0]  # [G]
        cs = comps[p * group_size: (p + 1) * group_size]
        groups.append(GroupSample(cs[0].prompt_ids, [c.token_ids for c in cs], [c.logprobs for c in cs],
                                  adv.tolist(), [c.keep_mask for c in cs] if record_keep else None,
                                  [c.indices for c in cs] if record_indices else None,
                                  [c.weight_version for c in cs],
                                  experts=[c.experts for c in cs] if all(c.experts is not None for c in cs)
                                  else None,
                                  token_versions=[c.token_versions for c in cs]))
    scored = _fully_scored(candidates)
    all_rewards = torch.stack(candidates)  # [P_all, G], NaN where unscored
    uniform = int((all_rewards[scored].amax(dim=1) == all_rewards[scored].amin(dim=1)).sum()) if scored else 0
    return groups, {"groups/kept": float(len(groups)), "groups/uniform": float(uniform),
                    "groups/dropped_unscored": float(len(candidates) - len(scored)),
                    "reward/mean": float(all_rewards.nanmean())}  # over the samples with a score
