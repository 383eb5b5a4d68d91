import torch

from .. import dispatch
from .reference import topk_indices_reference


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, T, S] fp32 (-inf = not visible) -> int32 [B, T, k], best first, -1 padded; ties at
    the k-th score go to the later slots (reference.py). Backends: reference, cpu (dispatch.py)."""
    if scores.dim() != 3:
        raise ValueError(f"scores: expected [B, T, S], got {tuple(scores.shape)}")
    if k < 1:
        raise ValueError(f"k={k}: expected k >= 1")
    return dispatch.choose("topk", scores)(scores, k)


def indexer_topk(q, w, k, topk: int, q_pos=None, k_pos=None, k_scale=None, chunk: int = 1024,
                 k_blocked=None) -> torch.Tensor:
    """Lightning-indexer scores and their top-k without the [T, S] score matrix.

    Same arguments as `indexer_scores` (q [B, T, H, D], w [B, T, H], k [B, S, D], positions, k_scale);
    returns int32 indices [B, T, topk] (-1 padded), the selection `topk_indices(indexer_scores(...))`
    makes. Backends: reference (chunked.py, `chunk` queries at a time: memory O(chunk * S)) and cpu
    (cpu.c, fused per query row; `chunk` unused). `k_blocked`: optionally the same keys in the C
    kernel's layout [B, >= S / KEY_BLOCK, D, KEY_BLOCK] fp32 (a StaticKVCache's `blocked_keys`), which the
    CPU backend then scores in place; the other backends ignore it.
    """
    return dispatch.choose("indexer_topk", q)(q, w, k, topk, q_pos, k_pos, k_scale, chunk, k_blocked)


__all__ = ["topk_indices", "indexer_topk", "topk_indices_reference"]
