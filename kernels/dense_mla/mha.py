"""MLA's MHA form (dense training and prefill) through torch SDPA, which picks its own fused kernel."""
import torch.nn.functional as F

from ..indexer_scores.reference import resolve_positions, visibility


def dense_mha_attention(q, k, v, sm_scale: float, q_pos=None, k_pos=None, mask=None):
    """q [B, T, H, Dqk], k [B, S, H, Dqk], v [B, S, H, Dv] -> [B, T, H, Dv]. Causal by positions, or by
    `mask` [B, T, S] bool (True: visible) when given (packed documents: models/doc_mask.py)."""
    B, T, H, _ = q.shape
    S = k.shape[1]
    Dv = v.shape[-1]
    if Dv < q.shape[-1]:
        # MLA's value width differs from its query/key width; SDPA's fused (flash) CPU/GPU kernels need
        # equal widths and otherwise fall back to the math kernel, which materialises [B, H, T, S]
        # (profiled: 2 GB per layer at 4k tokens). Zero columns change nothing in the output.
        v = F.pad(v, (0, q.shape[-1] - Dv))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, *, D]
    if mask is not None:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], scale=sm_scale)
    elif q_pos is None and k_pos is None and T == S:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=sm_scale)
    else:
        mask = visibility(*resolve_positions(B, T, S, q.device, q_pos, k_pos))  # [B, T, S]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], scale=sm_scale)
    return out.transpose(1, 2)[..., :Dv]  # [B, T, H, Dv]
