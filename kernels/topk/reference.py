"""Top-k selection over index scores, the definition of correctness.

Returns int32 indices [B, T, k], best first; -1 where a query has fewer than k visible keys
(visible = finite score). Ties may resolve in any order: compare selections as sets.
"""
import torch


def topk_indices_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    B, T, S = scores.shape
    kk = min(k, S)
    values, idx = scores.topk(kk, dim=-1)  # [B, T, kk]
    idx = idx.to(torch.int32).masked_fill(torch.isinf(values) & (values < 0), -1)
    if kk < k:
        idx = torch.cat([idx, idx.new_full((B, T, k - kk), -1)], dim=-1)
    return idx
