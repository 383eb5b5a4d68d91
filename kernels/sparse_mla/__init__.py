from .. import dispatch
from .reference import gather_rows, sparse_mla_attention_reference


def sparse_mla_attention(q, kv, indices, sm_scale: float, d_v: int, return_probs: bool = False):
    """Attention of each query over its selected latent KV rows (MQA form, all heads share a row).

    q [B, T, H, Dqk], kv [B, S, Dqk] = [c_kv ; k_pe], indices [B, T, K] int32 (-1 = none).
    Returns out [B, T, H, d_v] (values are kv[..., :d_v]), lse [B, T, H] fp32 (natural log),
    and with return_probs the head-summed probabilities [B, T, K] fp32 (0 on -1 entries).
    Differentiable in q and kv. Backends (dispatch.py): reference, cpu (cpu.c), triton; the last two
    recompute in backward, so their memory does not grow with T * K * Dqk.
    """
    return dispatch.choose("sparse_mla", q)(q, kv, indices, sm_scale, d_v, return_probs)


__all__ = ["sparse_mla_attention", "sparse_mla_attention_reference", "gather_rows"]
