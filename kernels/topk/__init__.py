import torch

from ..dispatch import use_triton
from ..indexer_scores import indexer_scores
from ..indexer_scores.reference import resolve_positions
from .keyed import topk_indices_keyed
from .reference import topk_indices_reference


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, T, S] fp32 (-inf = not visible) -> int32 [B, T, k], best first, -1 padded."""
    if use_triton(scores):
        from .triton import topk_indices_triton

        return topk_indices_triton(scores, k)
    return topk_indices_keyed(scores, k)  # the reference's selection in one topk pass


@torch.no_grad()
def indexer_topk(q, w, k, topk: int, q_pos=None, k_pos=None, k_scale=None, chunk: int = 1024):
    """Scores and selection fused per chunk of queries: memory O(chunk * S), never O(T * S).

    Same arguments as `indexer_scores`; returns int32 indices [B, T, topk] (-1 padded).
    """
    B, T = q.shape[:2]
    S = k.shape[1]
    q_pos, k_pos = resolve_positions(B, T, S, q.device, q_pos, k_pos)
    out = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        scores = indexer_scores(q[:, t0:t1], w[:, t0:t1], k, q_pos[:, t0:t1], k_pos, k_scale)
        out.append(topk_indices(scores, topk))
    return torch.cat(out, dim=1)


__all__ = ["topk_indices", "indexer_topk", "topk_indices_keyed", "topk_indices_reference"]
