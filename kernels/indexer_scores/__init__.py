import torch

from ..dispatch import forced_backend, use_triton
from .matmul import indexer_scores_matmul
from .reference import default_positions, indexer_scores_reference, visibility
from .selected import indexer_scores_selected


def indexer_scores(q, w, k, q_pos=None, k_pos=None, k_scale=None):
    """Lightning-indexer scores with the causal (position) mask.

    q [B, T, H, D] (fp32/bf16, or float8_e4m3fn with its scale folded into w), w [B, T, H] fp32,
    k [B, S, D] (float8 with k_scale [B, S] fp32), q_pos [B, T] / k_pos [B, S] int positions
    (default: queries are the last T of S tokens). Returns fp32 [B, T, S]:
    I[t, s] = k_scale[s] * sum_j w[t, j] * ReLU(q[t, j] . k[s]) where 0 <= k_pos[s] <= q_pos[t], else -inf.
    """
    if use_triton(q):
        from .triton import indexer_scores_triton

        return indexer_scores_triton(q, w, k, q_pos, k_pos, k_scale)
    if forced_backend() == "reference":
        return indexer_scores_reference(q, w, k, q_pos, k_pos, k_scale)
    if q.dtype == torch.float64:  # gradcheck and fp64 references keep their precision
        return indexer_scores_reference(q, w, k, q_pos, k_pos, k_scale)
    return indexer_scores_matmul(q, w, k, q_pos, k_pos, k_scale)


__all__ = ["indexer_scores", "indexer_scores_reference", "indexer_scores_selected", "default_positions",
           "visibility"]
