"""Dense MLA attention in MQA (absorbed) form: every visible key, no selection.

Used for decoding in `attention: dense` mode and as the warm-up target (head-summed probabilities).
Same maths as sparse_mla with S_t = all visible keys.
"""
import torch

from ..indexer_scores.reference import resolve_positions, upcast, visibility


def dense_mla_attention_reference(
    q: torch.Tensor,  # [B, T, H, Dqk]
    kv: torch.Tensor,  # [B, S, Dqk]
    sm_scale: float,
    d_v: int,
    q_pos: torch.Tensor | None = None,  # [B, T]
    k_pos: torch.Tensor | None = None,  # [B, S]
    return_probs: bool = False,
):
    B, T, H, _ = q.shape
    S = kv.shape[1]
    q_pos, k_pos = resolve_positions(B, T, S, q.device, q_pos, k_pos)
    scores = torch.einsum("bthd,bsd->bths", upcast(q), upcast(kv)) * sm_scale  # [B, T, H, S]
    scores = scores.masked_fill(~visibility(q_pos, k_pos)[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, T, H]
    p = torch.exp(scores - lse[..., None].clamp(min=-1e30))
    out = torch.einsum("bths,bsd->bthd", p, upcast(kv[..., :d_v])).to(q.dtype)
    if return_probs:
        return out, lse, p.sum(dim=2)  # [B, T, S]
    return out, lse
