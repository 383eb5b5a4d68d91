"""Top-k selection over index scores, the definition of correctness.

Returns int32 indices [B, T, k], best first; -1 where a query has fewer than k visible keys
(visible = finite score). Ties at the k-th score go to the later key slots (the most recent
tokens): ReLU scores tie at exactly 0 often, and a fixed rule makes the selected *set* the same
whatever the batch layout (a per-sample forward, a padded shared-prefix forward, a decode step), as
long as slot order follows position order among visible keys. The order within the set is unspecified.
"""
import torch


def recency_tiebreak_mask(scores: torch.Tensor, kk: int) -> torch.Tensor:
    """bool [B, T, S]: the kk best finite scores, ties at the threshold resolved toward later slots."""
    thr = scores.topk(kk, dim=-1).values[..., -1:]  # [B, T, 1] the k-th best score
    finite = torch.isfinite(scores)
    above = (scores > thr) & finite
    equal = (scores == thr) & finite
    need = kk - above.sum(-1, keepdim=True)  # how many tied keys still fit
    rank_from_end = equal.flip(-1).cumsum(-1).flip(-1)  # 1 for the last tied key, 2 for the one before...
    return above | (equal & (rank_from_end <= need))


def topk_indices_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    B, T, S = scores.shape
    kk = min(k, S)
    chosen = recency_tiebreak_mask(scores, kk)
    values, idx = scores.masked_fill(~chosen, float("-inf")).topk(kk, dim=-1)  # [B, T, kk]
    idx = idx.to(torch.int32).masked_fill(torch.isinf(values) & (values < 0), -1)
    if kk < k:
        idx = torch.cat([idx, idx.new_full((B, T, k - kk), -1)], dim=-1)
    return idx
