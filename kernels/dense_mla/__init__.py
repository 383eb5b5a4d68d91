from .. import dispatch
from .reference import dense_mla_attention_reference


def dense_mla_attention(q, kv, sm_scale: float, d_v: int, q_pos=None, k_pos=None, return_probs=False):
    """Dense attention in MQA (absorbed) form over every visible key; see reference.py.
    q [B, T, H, Dqk], kv [B, S, Dqk] -> out [B, T, H, d_v], lse [B, T, H] fp32 (, probs [B, T, S])."""
    return dispatch.choose("dense_mla", q)(q, kv, sm_scale, d_v, q_pos, k_pos, return_probs)


def dense_mha_attention(q, k, v, sm_scale: float, q_pos=None, k_pos=None, mask=None):
    """Plain multi-head attention (MLA's MHA form, used for dense training and prefill); see mha.py.
    q [B, T, H, Dqk], k [B, S, H, Dqk], v [B, S, H, Dv] -> [B, T, H, Dv]."""
    return dispatch.choose("dense_mha", q)(q, k, v, sm_scale, q_pos, k_pos, mask)


__all__ = ["dense_mla_attention", "dense_mha_attention", "dense_mla_attention_reference"]
