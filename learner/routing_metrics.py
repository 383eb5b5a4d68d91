"""MoE routing metrics of a GRPO update: expert load per layer, and how often the learner's own routing
differs from the sampler's ("keep routing", DeepSeek-V3.2 section 3.1).

Counted over the tokens whose routing reaches a log-prob: each group's prompt once (the learner routes
it once per group) and each completion's fed tokens, all but its last (grpo_batch.py).
    load[m, e]        tokens routed to expert e in MoE layer m
    moe/load_max      per layer max_e load / mean_e load (1 = balanced), averaged over the MoE layers
    moe/load_mean     per layer mean_e load = tokens * k / E, averaged over the MoE layers; load_max * load_mean
                      is the busiest expert's token count (the mean of the normalised loads would be 1)
    moe/load_max/layer_i   the per-layer max / mean, by model layer index
    moe/routing_mismatch   share of (token, MoE layer) whose top-k expert set differs from the sampler's:
                      measured with replay off (replayed routing is the sampler's by construction)
"""
from dataclasses import dataclass

import torch


@dataclass
class RoutingCounts:
    load: torch.Tensor  # [M, E] float64 tokens per expert
    mismatched: float = 0.0  # (token, layer) pairs whose expert set differs from the sampler's
    compared: float = 0.0  # (token, layer) pairs compared with the sampler's

    @classmethod
    def zeros(cls, n_layers: int, n_experts: int) -> "RoutingCounts":
        return cls(torch.zeros(n_layers, n_experts, dtype=torch.float64))

    def __add__(self, other: "RoutingCounts") -> "RoutingCounts":
        return RoutingCounts(self.load + other.load, self.mismatched + other.mismatched,
                             self.compared + other.compared)

    def flat(self) -> torch.Tensor:
        """[M*E + 2] float64: one tensor for an all-reduce over data-parallel ranks."""
        return torch.cat([self.load.flatten(), torch.tensor([self.mismatched, self.compared], dtype=torch.float64)])

    @classmethod
    def from_flat(cls, flat: torch.Tensor, n_layers: int) -> "RoutingCounts":
        return cls(flat[:-2].view(n_layers, -1), float(flat[-2]), float(flat[-1]))


def routed_token_masks(prompt_lens: torch.Tensor, Lp: int, completion_lens: torch.Tensor,
                       Lc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (prompt [P, Lp], completions [P*G, Lc]) bool: the real tokens whose routing reaches a log-prob."""
    prompt_lens, completion_lens = prompt_lens.cpu(), completion_lens.cpu()  # they index the routing on the CPU
    return (torch.arange(Lp)[None] < prompt_lens[:, None],
            torch.arange(Lc)[None] < completion_lens[:, None] - 1)


def routing_counts(used: tuple[torch.Tensor, torch.Tensor], sampler: tuple[torch.Tensor, torch.Tensor] | None,
                   masks: tuple[torch.Tensor, torch.Tensor], n_experts: int) -> RoutingCounts:
    """used: the learner's routing (prompt [P, Lp, M, k], completions [P*G, Lc, M, k]); sampler: the
    sampler's, same shapes, or None (nothing compared); masks: routed_token_masks."""
    M = used[0].shape[2]
    offset = (torch.arange(M) * n_experts)[:, None]  # [M, 1]: layer m's experts count in bins m*E ..
    out = RoutingCounts.zeros(M, n_experts)
    for i, mask in enumerate(masks):
        ids = used[i].cpu()[mask].long()  # [N, M, k]
        load = (ids + offset).flatten().bincount(minlength=M * n_experts).view(M, n_experts)
        out = out + RoutingCounts(load.double())
        if sampler is not None:
            want = sampler[i].cpu()[mask].long()  # [N, M, k]
            differs = (ids.sort(-1).values != want.sort(-1).values).any(-1)  # [N, M]: the sets differ
            out = out + RoutingCounts(torch.zeros_like(out.load), float(differs.sum()), float(differs.numel()))
    return out


def routing_metrics(counts: RoutingCounts, layer_ids: list[int], passes: int) -> dict[str, float]:
    """counts summed over `passes` passes over the batch; layer_ids: the model index of each MoE layer."""
    mean = counts.load.mean(dim=1)  # [M] tokens per expert
    ratio = counts.load.amax(dim=1) / mean.clamp(min=1e-12)  # [M] max / mean (0 when nothing was routed)
    out = {"moe/load_max": float(ratio.mean()), "moe/load_mean": float(mean.mean()) / passes}
    out.update({f"moe/load_max/layer_{i}": float(r) for i, r in zip(layer_ids, ratio)})
    if counts.compared:
        out["moe/routing_mismatch"] = counts.mismatched / counts.compared
    return out
