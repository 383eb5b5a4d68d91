"""Sparse MLA attention in MQA form, the definition of correctness.

For query t and head h, over the selected keys S_t = {indices[b, t, i] >= 0}:
    p[h, i]  = softmax_i( sm_scale * q[b, t, h] . kv[b, indices[b, t, i]] )
    out[h]   = sum_i p[h, i] * kv[b, indices[b, t, i], :d_v]     (values are the latent c_kv)
    lse[h]   = logsumexp_i( sm_scale * q . kv )                  (natural log; -inf if S_t is empty)
    probs[i] = sum_h p[h, i]                                     (head-summed, for the indexer KL)
A query with no selected key gets out = 0.
"""
import torch

from ..indexer_scores.reference import upcast


def gather_rows(kv: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """kv [B, S, D], indices [B, T, K] (-1 allowed) -> [B, T, K, D] (row 0 where index is -1)."""
    B, T, K = indices.shape
    flat = indices.clamp(min=0).long().reshape(B, T * K)  # [B, T*K]
    rows = torch.gather(kv, 1, flat[..., None].expand(B, T * K, kv.shape[-1]))  # [B, T*K, D]
    return rows.view(B, T, K, kv.shape[-1])


def sparse_mla_attention_reference(
    q: torch.Tensor,  # [B, T, H, Dqk]
    kv: torch.Tensor,  # [B, S, Dqk]  rows [c_kv ; k_pe]
    indices: torch.Tensor,  # [B, T, K] int, -1 = no key
    sm_scale: float,
    d_v: int,
    return_probs: bool = False,
):
    valid = indices >= 0  # [B, T, K]
    kv_sel = gather_rows(kv, indices)  # [B, T, K, Dqk]
    scores = torch.einsum("bthd,btkd->bthk", upcast(q), upcast(kv_sel)) * sm_scale  # [B, T, H, K]
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, T, H]
    p = torch.exp(scores - lse[..., None].clamp(min=-1e30))  # empty rows: exp(-inf) = 0
    out = torch.einsum("bthk,btkd->bthd", p, upcast(kv_sel[..., :d_v])).to(q.dtype)  # [B, T, H, d_v]
    if return_probs:
        return out, lse, p.sum(dim=2)  # [B, T, K]
    return out, lse
