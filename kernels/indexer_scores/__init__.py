from .. import dispatch
from .reference import default_positions, indexer_scores_reference, visibility


def indexer_scores(q, w, k, q_pos=None, k_pos=None, k_scale=None):
    """Lightning-indexer scores with the causal (position) mask.

    q [B, T, H, D] (fp32/bf16, or float8_e4m3fn with its scale folded into w), w [B, T, H] fp32,
    k [B, S, D] (float8 with k_scale [B, S] fp32), q_pos [B, T] / k_pos [B, S] int positions
    (default: queries are the last T of S tokens). Returns fp32 [B, T, S]:
    I[t, s] = k_scale[s] * sum_j w[t, j] * ReLU(q[t, j] . k[s]) where 0 <= k_pos[s] <= q_pos[t], else -inf.
    Backends (dispatch.py): reference, cpu (matmul.py), triton.
    """
    return dispatch.choose("indexer_scores", q)(q, w, k, q_pos, k_pos, k_scale)


def indexer_scores_selected(q, w, k, indices, k_scale=None):
    """The scores of each query's selected keys only: q [B, T, H, D], w [B, T, H], k [B, S, D],
    indices [B, T, K] (-1 allowed: key row 0, mask it yourself) -> fp32 [B, T, K] (selected.py)."""
    return dispatch.choose("indexer_scores_selected", q)(q, w, k, indices, k_scale)


__all__ = ["indexer_scores", "indexer_scores_reference", "indexer_scores_selected", "default_positions",
           "visibility"]
