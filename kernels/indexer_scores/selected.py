"""Lightning-indexer scores on given keys only: I[t, s] for s in S_t, not for every visible s.

    I_sel[b, t, i] = k_scale[b, s] * sum_j w[b, t, j] * ReLU(q[b, t, j] . k[b, s]),   s = indices[b, t, i]

The sparse stage's KL is restricted to the selected set S_t (DESIGN.md section 5), so it needs the
scores of K keys per query, not of all L: O(T K H d) work and memory, where the full scores gathered
on S_t cost O(T L H d) and kept an [chunk, L] graph for the backward. Same values as gathering
`indexer_scores_reference` on `indices` (slots with index -1 get key row 0: mask them yourself).
Plain torch, differentiable in q, w and k.
"""
import torch

from ..sparse_mla.reference import gather_rows
from .reference import upcast


def indexer_scores_selected(q, w, k, indices, k_scale=None) -> torch.Tensor:
    """q [B, T, H, D], w [B, T, H], k [B, S, D], indices [B, T, K] (-1 allowed) -> fp32 [B, T, K]."""
    k_sel = gather_rows(upcast(k), indices)  # [B, T, K, D]
    logits = torch.einsum("bthd,btkd->btkh", upcast(q), k_sel)  # [B, T, K, H]
    scores = (logits.relu() * upcast(w)[:, :, None, :]).sum(-1)
    if k_scale is not None:
        scores = scores * torch.gather(upcast(k_scale), 1, indices.clamp(min=0).long().flatten(1)).view_as(scores)
    return scores
