from .. import dispatch
from .reference import indexer_kl_loss_reference


def indexer_kl_loss(target, scores, valid=None):
    """mean_t KL(p_t || softmax(I_t)) over each query's candidate keys; gradient into scores only.

    target [B, T, K] non-negative attention mass (normalised inside), scores [B, T, K] fp32,
    valid [B, T, K] bool (default: finite scores). Returns a scalar fp32.
    Backends (dispatch.py): reference, triton.
    """
    return dispatch.choose("indexer_kl", scores)(target, scores, valid)


__all__ = ["indexer_kl_loss", "indexer_kl_loss_reference"]
