"""The batch a GRPO update consumes: groups of G completions of one prompt, with their advantages.

Built by the driver from the rollout engine's completions and the reward workers' scores; plain
tensors and lists, so it crosses Ray without custom serialisation.
"""
from dataclasses import dataclass, fields, replace

import torch

from dsarl.data.index_codec import replay_rows
from dsarl.data.step_types import GroupSample


@dataclass
class PaddedGroups:
    """A micro-batch of P groups of G completions, right-padded."""

    prompts: torch.Tensor  # [P, Lp] prompt ids (pad 0)
    prompt_lens: torch.Tensor  # [P]
    completions: torch.Tensor  # [P*G, Lc] completion ids (row p*G + g)
    completion_lens: torch.Tensor  # [P*G]
    mask: torch.Tensor  # [P*G, Lc] float, 1 on real completion tokens
    sampler_logp: torch.Tensor  # [P*G, Lc]
    advantages: torch.Tensor  # [P*G]
    keep_mask: torch.Tensor | None  # [P*G, Lc, V] bool
    indices: list[torch.Tensor] | None  # per layer [P*G, Lc, K]: sampler selections in learner key slots
    group_size: int
    prompt_experts: torch.Tensor | None = None  # [P, Lp, M, k]: the sampler's routing of the prompt tokens
    experts: torch.Tensor | None = None  # [P*G, Lc, M, k]: ... of the completion tokens the learner feeds

    def to(self, device) -> "PaddedGroups":
        """This micro-batch on `device` (pad_groups builds it on the CPU; the learner's model may be on a GPU)."""
        def move(v):
            if isinstance(v, torch.Tensor):
                return v.to(device, non_blocking=True)
            if isinstance(v, list):
                return [move(x) for x in v]
            return v
        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})


def pad_groups(groups: list[GroupSample], vocab_size: int, pad_id: int = 0, dense_within: int = 0) -> PaddedGroups:
    """dense_within: the model's DSAConfig.dense_within. A batch whose queries see at most that many keys
    (Lp + Lc) runs dense, its sampler having selected every visible key: its selections are not decoded."""
    G = groups[0].group_size
    if any(g.group_size != G for g in groups):
        raise ValueError(f"every group needs the same number of completions, got {[g.group_size for g in groups]}")
    P = len(groups)
    Lp = max(len(g.prompt_ids) for g in groups)
    comps = [c for g in groups for c in g.completions]
    Lc = max(1, max(len(c) for c in comps))
    prompts = torch.full((P, Lp), pad_id, dtype=torch.long)
    for p, g in enumerate(groups):
        prompts[p, : len(g.prompt_ids)] = torch.tensor(g.prompt_ids)
    completions = torch.full((P * G, Lc), pad_id, dtype=torch.long)
    sampler_logp = torch.zeros(P * G, Lc)
    for i, (c, lp) in enumerate(zip(comps, (lp for g in groups for lp in g.sampler_logprobs))):
        completions[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        sampler_logp[i, : len(lp)] = torch.tensor(lp)
    comp_lens = torch.tensor([len(c) for c in comps])
    mask = (torch.arange(Lc)[None] < comp_lens[:, None]).float()
    keep = None
    if all(g.keep_masks is not None for g in groups):
        keep = torch.ones(P * G, Lc, vocab_size, dtype=torch.bool)
        for i, km in enumerate(km for g in groups for km in g.keep_masks):
            for t, ids in enumerate(km):
                keep[i, t] = False
                keep[i, t, ids] = True
    indices = None
    if all(g.indices is not None for g in groups) and Lp + Lc > dense_within:
        indices = _sampler_indices_in_learner_slots(groups, Lp, Lc)
    prompt_experts = experts = None
    if all(g.experts is not None for g in groups):
        prompt_experts, experts = _sampler_experts_in_learner_slots(groups, Lp, Lc)
    return PaddedGroups(prompts, torch.tensor([len(g.prompt_ids) for g in groups]), completions, comp_lens, mask,
                        sampler_logp, torch.tensor([a for g in groups for a in g.advantages], dtype=torch.float32),
                        keep, indices, G, prompt_experts, experts)


def _sampler_indices_in_learner_slots(groups: list[GroupSample], Lp: int, Lc: int) -> list[torch.Tensor]:
    """The sampler's per-token top-k (absolute positions) as key slots of the learner's forward.

    The learner feeds completion token j at query position plen + j and predicts token j + 1 there,
    which the sampler selected for as its step j + 1. Its keys are [prompt padded to Lp ; completion],
    so position s maps to slot s (s < plen) or Lp + s - plen. Each record is decoded (or, raw, sorted)
    into canonical rows, ascending then -1: the mapping is increasing, so slots stay in that order, and
    the learner sees the same rows, hence the same bits, from the encoded and the raw form.
    """
    rows = []
    for g in groups:
        plen = len(g.prompt_ids)
        for idx in map(replay_rows, g.indices):  # [T, L, K] int32, rows canonical
            T, L, K = idx.shape
            shifted = torch.full((Lc, L, K), -1, dtype=torch.int32)
            nxt = idx[1:].long()  # selections for the queries at completion positions 0..T-2
            slots = torch.where(nxt < plen, nxt, nxt - plen + Lp)
            shifted[: T - 1] = torch.where(nxt >= 0, slots, torch.full_like(slots, -1)).to(torch.int32)
            rows.append(shifted)
    stacked = torch.stack(rows)  # [P*G, Lc, L, K]
    return [stacked[:, :, layer].contiguous() for layer in range(stacked.shape[2])]


def _sampler_experts_in_learner_slots(groups: list[GroupSample], Lp: int, Lc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's routing per fed token (rows [P + T - 1, M, k]) as the inputs of the learner's two forwards.

    No shift, unlike the indexer's selection: routing belongs to the token a position feeds, not to the
    token it predicts. The prompt forward feeds prompt token s at slot s: row s of any of the group's
    completions (the engine routed the prompt once, in the prefill its G samples share). The completion
    forward feeds completion token j at slot j: row plen + j, for j < T - 1. The sampler never fed a
    completion's last token (nothing it routes reaches a log-prob), nor padding: those slots route to
    experts 0..k-1, which keeps the replayed routing a valid distinct top-k everywhere.
    -> (prompt [P, Lp, M, k], completions [P*G, Lc, M, k]) in the recorded dtype.
    """
    first = groups[0].experts[0]
    M, k = first.shape[1:]
    filler = torch.arange(k, dtype=first.dtype)
    prompts = filler.expand(len(groups), Lp, M, k).clone()  # [P, Lp, M, k]
    comps = filler.expand(len(groups) * groups[0].group_size, Lc, M, k).clone()  # [P*G, Lc, M, k]
    row = 0
    for p, g in enumerate(groups):
        plen = len(g.prompt_ids)
        prompts[p, :plen] = g.experts[0][:plen]
        for c, e in zip(g.completions, g.experts):
            if e.shape != (plen + len(c) - 1, M, k):
                raise ValueError(f"experts of a {plen}-token prompt's {len(c)}-token completion have shape "
                                 f"{tuple(e.shape)}, expected {(plen + len(c) - 1, M, k)}")
            comps[row, : len(c) - 1] = e[plen:]
            row += 1
    return prompts, comps
