"""Indexer KL loss (DSA paper eqs. 3 and 4), the definition of correctness.

    loss = mean_t  sum_{s in S_t} p[t, s] * (log p[t, s] - log softmax_{S_t}(I[t, :])[s])
where S_t = {s : valid[t, s]}, p[t] is the target distribution over S_t (L1-normalised here, so
callers may pass unnormalised head-summed attention), and queries with an empty S_t are skipped.
The gradient flows into the scores only; the target is treated as a constant.
"""
import torch

from ..indexer_scores.reference import upcast


def indexer_kl_loss_reference(
    target: torch.Tensor,  # [B, T, K] non-negative attention mass on each candidate key
    scores: torch.Tensor,  # [B, T, K] index scores on the same keys
    valid: torch.Tensor | None = None,  # [B, T, K] bool; default: finite scores
) -> torch.Tensor:
    if valid is None:
        valid = torch.isfinite(scores)
    p = upcast(target.detach()).masked_fill(~valid, 0.0)
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-30)  # L1-normalise over S_t
    logq = torch.log_softmax(upcast(scores).masked_fill(~valid, float("-inf")), dim=-1)
    plogp = torch.where(p > 0, p * torch.log(p.clamp(min=1e-30)), torch.zeros_like(p))
    plogq = torch.where(p > 0, p * logq.masked_fill(~valid, 0.0), torch.zeros_like(p))
    kl = (plogp - plogq).sum(-1)  # [B, T]
    has_keys = valid.any(-1)  # [B, T]
    return kl[has_keys].sum() / has_keys.sum().clamp(min=1)
