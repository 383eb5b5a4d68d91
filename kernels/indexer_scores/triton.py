"""Fused lightning-indexer scores in Triton (DSA paper eq. 1; DeepSeek `fp8_index` semantics).

One program owns a tile of BT queries x BS keys of one sequence and loops over the H index heads:
per head one [BT, D] x [D, BS] dot, ReLU and the weight w[t, j] applied in registers, summed into a
fp32 [BT, BS] accumulator, so the [T, S, H] logits never reach memory. Tiles with no visible
(query, key) pair skip the head loop and only write -inf. Inputs fp32, bf16 or float8_e4m3fn (q's
scale folded into w by the caller, k's per-token scale applied once per key at the end).
fp32 inputs use IEEE dots (no tf32) so the kernel matches the fp32 reference to 1e-5.
"""
import torch
import triton
import triton.language as tl

from .reference import resolve_positions


@triton.jit
def _indexer_scores_kernel(
    q,  # [B, T, H, D]
    w,  # [B, T, H] fp32
    k,  # [B, S, D]
    k_scale,  # [B, S] fp32 (unused unless HAS_SCALE)
    q_pos,  # [B, T] int32
    k_pos,  # [B, S] int32
    out,  # [B, T, S] fp32
    T, S, H, D,
    HAS_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
    BT: tl.constexpr,
    BS: tl.constexpr,
    BD: tl.constexpr,
):
    i_t, i_s = tl.program_id(0), tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)  # int64 offsets: T * S passes 2^31 at 64k tokens
    o_t = i_t * BT + tl.arange(0, BT)
    o_s = i_s * BS + tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    m_t, m_s, m_d = o_t < T, o_s < S, o_d < D

    b_qp = tl.load(q_pos + i_b * T + o_t, mask=m_t, other=-1)  # [BT]
    b_kp = tl.load(k_pos + i_b * S + o_s, mask=m_s, other=-1)  # [BS]; padding keys are never visible
    m_vis = (b_kp[None, :] <= b_qp[:, None]) & (b_kp[None, :] >= 0)  # [BT, BS]

    p_k = k + (i_b * S + o_s[:, None]) * D + o_d[None, :]
    b_k = tl.load(p_k, mask=m_s[:, None] & m_d[None, :], other=0.0)  # [BS, BD]
    b_acc = tl.zeros([BT, BS], dtype=tl.float32)
    n_h = tl.where(tl.max(m_vis.to(tl.int32)) > 0, H, 0)  # fully masked tile: no dots at all
    for i_h in range(0, n_h):
        p_q = q + ((i_b * T + o_t[:, None]) * H + i_h) * D + o_d[None, :]
        b_q = tl.load(p_q, mask=m_t[:, None] & m_d[None, :], other=0.0)  # [BT, BD]
        b_w = tl.load(w + (i_b * T + o_t) * H + i_h, mask=m_t, other=0.0)  # [BT]
        b_l = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [BT, BS] fp32 accumulation
        b_acc += tl.maximum(b_l, 0.0) * b_w[:, None]
    if HAS_SCALE:
        b_ks = tl.load(k_scale + i_b * S + o_s, mask=m_s, other=0.0)  # [BS]
        b_acc = b_acc * b_ks[None, :]
    b_out = tl.where(m_vis, b_acc, float("-inf"))
    p_out = out + (i_b * T + o_t[:, None]) * S + o_s[None, :]
    tl.store(p_out, b_out, mask=m_t[:, None] & m_s[None, :])


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the choice only matters for fp32 operands


def indexer_scores_fwd(q, w, k, q_pos, k_pos, k_scale, block_t: int = 64, block_s: int = 64):
    B, T, H, D = q.shape
    S = k.shape[1]
    q, w, k = q.contiguous(), w.float().contiguous(), k.contiguous()
    if k.dtype != q.dtype:
        k = k.to(q.dtype)  # tl.dot needs one operand dtype (fp8 x fp8 or bf16 x bf16 ...)
    q_pos = q_pos.to(torch.int32).expand(B, T).contiguous()
    k_pos = k_pos.to(torch.int32).expand(B, S).contiguous()
    has_scale = k_scale is not None
    k_scale = k_scale.float().contiguous() if has_scale else w  # placeholder pointer, never read
    out = torch.full((B, T, S), float("nan"), device=q.device, dtype=torch.float32)
    BT = max(16, min(block_t, triton.next_power_of_2(T)))
    BS = max(16, min(block_s, triton.next_power_of_2(S)))
    BD = max(16, triton.next_power_of_2(D))
    grid = (triton.cdiv(T, BT), triton.cdiv(S, BS), B)
    _indexer_scores_kernel[grid](
        q, w, k, k_scale, q_pos, k_pos, out, T, S, H, D,
        HAS_SCALE=has_scale, PRECISION=_dot_precision(q.dtype), BT=BT, BS=BS, BD=BD,
    )
    return out


def indexer_scores_triton(q, w, k, q_pos=None, k_pos=None, k_scale=None):
    """Same contract as `dsarl.kernels.indexer_scores` (see reference.py); no autograd."""
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[2] != D:
        raise ValueError(f"k: expected [B={B}, S, D={D}], got {tuple(k.shape)}")
    if w.shape != (B, T, H):
        raise ValueError(f"w: expected {(B, T, H)}, got {tuple(w.shape)}")
    S = k.shape[1]
    q_pos, k_pos = resolve_positions(B, T, S, q.device, q_pos, k_pos)
    return indexer_scores_fwd(q, w, k, q_pos, k_pos, k_scale)
