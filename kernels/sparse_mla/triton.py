"""Sparse MLA attention (MQA form) in Triton: forward with online softmax, backward by recompute.

Design (DSA.md sections 5.1 and 6.3, our own code):
- One program per (query token, block of BH heads, sequence). The heads are the M dimension of
  every tl.dot, so one gathered KV row serves all BH heads; H is padded to a power of two with masks.
- The Dqk-wide key is split into the value part [:d_v] (the latent c_kv, BV = next_pow2(d_v)) and the
  tail [d_v:] (k_pe, BR = next_pow2(Dqk - d_v)): q.k = q[:d_v].kv[:d_v] + q[d_v:].kv[d_v:], and the
  value tile is the same registers as the key's first part (one gather per selected row, 576 -> 512 +
  64 instead of padding 576 to 1024).
- Softmax in the log2 domain (exp2, scores pre-multiplied by sm_scale * log2 e); lse is stored in
  natural log, as the contract says.
- return_probs: the head-summed probability of each selected key needs the final lse, which the
  online pass only knows at its end. We run a second, lighter loop in the same program after the
  main one: it re-gathers the rows and recomputes only q.k (no P.V, no rescaling), about +53% of the
  forward flops at Dqk 576 / d_v 512, and only when probs are requested (the sparse-stage KL
  target). The alternative, storing per-head scores for a cheap rescale, would write H*K*4 bytes per
  token (1 MB at H=128, K=2048), far more traffic than the recompute. With more than one head block
  the per-block head sums are added with fp32 atomics into a zero-initialised buffer (exact and
  order-independent for two blocks, i.e. H <= 128 at BH = 64).
- Backward: dq and dkv from the saved lse (P recomputed, nothing stored per key), delta =
  rowsum(out * dout) - dlse (so a gradient flowing into lse is honoured too). dkv is accumulated
  across all queries that selected a row with fp32 atomics into a [B, S, Dqk] fp32 buffer, cast to
  kv's dtype at the end (non-deterministic summation order on GPU, as in TileLang's sparse_mla_bwd).
- fp32 inputs use IEEE dots (no tf32) so the kernel matches the fp32 reference; bf16 inputs keep bf16
  operands with fp32 accumulation.
"""
import math

import torch
import triton
import triton.language as tl

from .function import sparse_mla_autograd

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _sparse_mla_fwd_kernel(
    q,  # [B, T, H, DQK]
    kv,  # [B, S, DQK]
    idx,  # [B, T, K] int32, -1 = none
    out,  # [B, T, H, DV]
    lse,  # [B, T, H] fp32, natural log
    probs,  # [B, T, K] fp32, zero-initialised (only with RETURN_PROBS)
    T, S, H, K, DQK, DV,
    scale_log2,  # sm_scale * log2(e)
    HAS_TAIL: tl.constexpr,
    RETURN_PROBS: tl.constexpr,
    PRECISION: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BR: tl.constexpr,
):
    i_t, i_hb = tl.program_id(0), tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)  # int64 offsets: T * H * Dqk passes 2^31 at 64k tokens
    i_bt = i_b * T + i_t
    o_h = i_hb * BH + tl.arange(0, BH)
    o_v = tl.arange(0, BV)
    o_r = tl.arange(0, BR)
    m_h, m_v, m_r = o_h < H, o_v < DV, DV + o_r < DQK

    p_q = q + (i_bt * H + o_h[:, None]) * DQK
    b_q = tl.load(p_q + o_v[None, :], mask=m_h[:, None] & m_v[None, :], other=0.0)  # [BH, BV]
    b_qr = tl.load(p_q + DV + o_r[None, :], mask=m_h[:, None] & m_r[None, :], other=0.0)  # [BH, BR]

    b_m = tl.full([BH], float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    b_l = tl.zeros([BH], dtype=tl.float32)  # running sum of exp2
    b_acc = tl.zeros([BH, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_i = tl.load(idx + i_bt * K + o_k, mask=o_k < K, other=-1)  # [BK]
        m_sel = b_i >= 0
        p_kv = kv + (i_b * S + b_i[:, None]) * DQK
        b_kv = tl.load(p_kv + o_v[None, :], mask=m_sel[:, None] & m_v[None, :], other=0.0)  # [BK, BV]
        b_s = tl.dot(b_q, tl.trans(b_kv), input_precision=PRECISION)  # [BH, BK]
        if HAS_TAIL:
            b_kr = tl.load(p_kv + DV + o_r[None, :], mask=m_sel[:, None] & m_r[None, :], other=0.0)  # [BK, BR]
            b_s += tl.dot(b_qr, tl.trans(b_kr), input_precision=PRECISION)
        b_s = tl.where(m_sel[None, :], b_s * scale_log2, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, axis=1))  # [BH]
        b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)  # no key yet: avoid -inf - -inf
        b_p = tl.exp2(b_s - b_ms[:, None])  # [BH, BK]
        b_alpha = tl.exp2(b_m - b_ms)  # [BH]
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_kv.dtype), b_kv, input_precision=PRECISION)
        b_m = b_mn

    b_lse2 = tl.where(b_l > 0, b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0)), float("-inf"))  # [BH]
    b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]  # empty selection: out = 0
    p_o = out + (i_bt * H + o_h[:, None]) * DV + o_v[None, :]
    tl.store(p_o, b_o.to(out.dtype.element_ty), mask=m_h[:, None] & m_v[None, :])
    tl.store(lse + i_bt * H + o_h, b_lse2 * 0.6931471805599453, mask=m_h)

    if RETURN_PROBS:
        b_lss = tl.where(b_lse2 == float("-inf"), 0.0, b_lse2)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            b_i = tl.load(idx + i_bt * K + o_k, mask=o_k < K, other=-1)
            m_sel = b_i >= 0
            p_kv = kv + (i_b * S + b_i[:, None]) * DQK
            b_kv = tl.load(p_kv + o_v[None, :], mask=m_sel[:, None] & m_v[None, :], other=0.0)
            b_s = tl.dot(b_q, tl.trans(b_kv), input_precision=PRECISION)
            if HAS_TAIL:
                b_kr = tl.load(p_kv + DV + o_r[None, :], mask=m_sel[:, None] & m_r[None, :], other=0.0)
                b_s += tl.dot(b_qr, tl.trans(b_kr), input_precision=PRECISION)
            m_p = m_h[:, None] & m_sel[None, :]
            b_p = tl.where(m_p, tl.exp2(b_s * scale_log2 - b_lss[:, None]), 0.0)  # [BH, BK] final probs
            tl.atomic_add(probs + i_bt * K + o_k, tl.sum(b_p, axis=0), mask=o_k < K)


@triton.jit
def _sparse_mla_bwd_kernel(
    q,  # [B, T, H, DQK]
    kv,  # [B, S, DQK]
    idx,  # [B, T, K] int32
    do,  # [B, T, H, DV]
    lse,  # [B, T, H] fp32, natural log
    delta,  # [B, T, H] fp32: rowsum(out * do) - dlse
    dq,  # [B, T, H, DQK] fp32
    dkv,  # [B, S, DQK] fp32, zero-initialised, atomically accumulated
    T, S, H, K, DQK, DV,
    sm_scale,
    scale_log2,
    HAS_TAIL: tl.constexpr,
    PRECISION: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BR: tl.constexpr,
):
    i_t, i_hb = tl.program_id(0), tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)  # int64 offsets: T * H * Dqk passes 2^31 at 64k tokens
    i_bt = i_b * T + i_t
    o_h = i_hb * BH + tl.arange(0, BH)
    o_v = tl.arange(0, BV)
    o_r = tl.arange(0, BR)
    m_h, m_v, m_r = o_h < H, o_v < DV, DV + o_r < DQK

    p_q = q + (i_bt * H + o_h[:, None]) * DQK
    b_q = tl.load(p_q + o_v[None, :], mask=m_h[:, None] & m_v[None, :], other=0.0)  # [BH, BV]
    b_qr = tl.load(p_q + DV + o_r[None, :], mask=m_h[:, None] & m_r[None, :], other=0.0)  # [BH, BR]
    b_do = tl.load(do + (i_bt * H + o_h[:, None]) * DV + o_v[None, :], mask=m_h[:, None] & m_v[None, :], other=0.0)
    b_lse2 = tl.load(lse + i_bt * H + o_h, mask=m_h, other=0.0) * 1.4426950408889634  # [BH]
    b_lse2 = tl.where(b_lse2 == float("-inf"), 0.0, b_lse2)  # empty selection: every p is 0 anyway
    b_delta = tl.load(delta + i_bt * H + o_h, mask=m_h, other=0.0)  # [BH]

    b_dq = tl.zeros([BH, BV], dtype=tl.float32)
    b_dqr = tl.zeros([BH, BR], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_i = tl.load(idx + i_bt * K + o_k, mask=o_k < K, other=-1)  # [BK]
        m_sel = b_i >= 0
        p_kv = kv + (i_b * S + b_i[:, None]) * DQK
        b_kv = tl.load(p_kv + o_v[None, :], mask=m_sel[:, None] & m_v[None, :], other=0.0)  # [BK, BV]
        b_s = tl.dot(b_q, tl.trans(b_kv), input_precision=PRECISION)  # [BH, BK]
        if HAS_TAIL:
            b_kr = tl.load(p_kv + DV + o_r[None, :], mask=m_sel[:, None] & m_r[None, :], other=0.0)  # [BK, BR]
            b_s += tl.dot(b_qr, tl.trans(b_kr), input_precision=PRECISION)
        m_p = m_h[:, None] & m_sel[None, :]
        b_p = tl.where(m_p, tl.exp2(b_s * scale_log2 - b_lse2[:, None]), 0.0)  # [BH, BK] recomputed P
        b_dp = tl.dot(b_do, tl.trans(b_kv), input_precision=PRECISION)  # [BH, BK]
        b_ds = b_p * (b_dp - b_delta[:, None])  # [BH, BK] dL/d(score), score = sm_scale * q.k
        b_dsd = b_ds.to(b_kv.dtype)
        b_dq += tl.dot(b_dsd, b_kv, input_precision=PRECISION)
        b_dkv = tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=PRECISION)  # [BK, BV] value part
        b_dkv += tl.dot(tl.trans(b_dsd), b_q, input_precision=PRECISION) * sm_scale  # [BK, BV] key part
        p_dkv = dkv + (i_b * S + b_i[:, None]) * DQK
        tl.atomic_add(p_dkv + o_v[None, :], b_dkv, mask=m_sel[:, None] & m_v[None, :])
        if HAS_TAIL:
            b_dqr += tl.dot(b_dsd, b_kr, input_precision=PRECISION)
            b_dkr = tl.dot(tl.trans(b_dsd), b_qr, input_precision=PRECISION) * sm_scale  # [BK, BR]
            tl.atomic_add(p_dkv + DV + o_r[None, :], b_dkr, mask=m_sel[:, None] & m_r[None, :])

    p_dq = dq + (i_bt * H + o_h[:, None]) * DQK
    tl.store(p_dq + o_v[None, :], b_dq * sm_scale, mask=m_h[:, None] & m_v[None, :])
    tl.store(p_dq + DV + o_r[None, :], b_dqr * sm_scale, mask=m_h[:, None] & m_r[None, :])


def _blocks(H: int, K: int, Dqk: int, d_v: int, block_h: int, block_k: int):
    BH = max(16, min(block_h, triton.next_power_of_2(H)))
    BK = max(16, min(block_k, triton.next_power_of_2(K)))
    BV = max(16, triton.next_power_of_2(d_v))
    BR = max(16, triton.next_power_of_2(max(Dqk - d_v, 1)))
    num_warps = 8 if BH * BV >= 64 * 256 else 4
    return BH, BK, BV, BR, num_warps


# (BH, BK, num_stages) that fit the shared memory, per (kernel, shape, dtype): found once, then reused
_FITTING: dict[tuple, tuple[int, int, int | None]] = {}


def _candidates(BH: int, BK: int):
    """The requested blocks first, then smaller ones: fewer software-pipeline stages, a narrower key
    block, fewer heads per program (each halving of BH doubles the kv gathers, so it comes last). At
    H=128, Dqk=576, d_v=512 in bf16 the backward's first choice asks an H100 for 385 KB of shared
    memory against 227 KB (its q, dout and dq tiles are [BH, 512] each)."""
    yield BH, BK, None
    for bh in [b for b in (BH, BH // 2, BH // 4) if b >= 16]:
        for bk in [b for b in (BK, BK // 2) if b >= 16]:
            yield bh, bk, 1


def _launch(kernel, T: int, B: int, H: int, BH: int, BK: int, key: tuple, *args, **meta):
    """kernel[grid](*args, BH=, BK=, **meta) with the first candidate blocks the GPU can hold."""
    key = (kernel.fn.__name__, *key)
    tried = [_FITTING[key]] if key in _FITTING else list(_candidates(BH, BK))
    for bh, bk, stages in tried:
        extra = {} if stages is None else {"num_stages": stages}
        try:
            kernel[(T, triton.cdiv(H, bh), B)](*args, BH=bh, BK=bk, **meta, **extra)
        except triton.runtime.errors.OutOfResources:
            continue
        _FITTING[key] = (bh, bk, stages)
        return
    raise RuntimeError(f"{kernel.fn.__name__}: no block size fits this GPU's shared memory "
                       f"(H={H}, tried {tried})")


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # only matters for fp32 operands


def sparse_mla_fwd(q, kv, indices, sm_scale: float, d_v: int, return_probs: bool,
                   block_h: int = 64, block_k: int = 32):
    B, T, H, Dqk = q.shape
    S, K = kv.shape[1], indices.shape[-1]
    q, kv, indices = q.contiguous(), kv.contiguous(), indices.to(torch.int32).contiguous()
    out = torch.full((B, T, H, d_v), float("nan"), device=q.device, dtype=q.dtype)
    lse = torch.full((B, T, H), float("nan"), device=q.device, dtype=torch.float32)
    probs = torch.zeros((B, T, K), device=q.device, dtype=torch.float32) if return_probs else lse
    BH, BK, BV, BR, num_warps = _blocks(H, K, Dqk, d_v, block_h, block_k)
    _launch(_sparse_mla_fwd_kernel, T, B, H, BH, BK, (H, K, Dqk, d_v, q.dtype, return_probs),
            q, kv, indices, out, lse, probs, T, S, H, K, Dqk, d_v, sm_scale * LOG2E,
            HAS_TAIL=Dqk > d_v, RETURN_PROBS=return_probs, PRECISION=_precision(q.dtype),
            BV=BV, BR=BR, num_warps=num_warps)
    return out, lse, (probs if return_probs else None)


def sparse_mla_bwd(q, kv, indices, out, lse, dout, dlse, sm_scale: float, d_v: int,
                   block_h: int = 64, block_k: int = 32):
    B, T, H, Dqk = q.shape
    S, K = kv.shape[1], indices.shape[-1]
    q, kv, indices = q.contiguous(), kv.contiguous(), indices.to(torch.int32).contiguous()
    dout = dout.to(q.dtype).contiguous()
    delta = (out.float() * dout.float()).sum(-1)  # [B, T, H] fp32 rowsum(O * dO)
    if dlse is not None:
        delta = delta - dlse.float()  # d lse / d score = p, folded into the same (dP - delta) term
    dq = torch.full((B, T, H, Dqk), float("nan"), device=q.device, dtype=torch.float32)
    dkv = torch.zeros((B, S, Dqk), device=q.device, dtype=torch.float32)  # atomics need zeros
    BH, BK, BV, BR, num_warps = _blocks(H, K, Dqk, d_v, block_h, block_k)
    _launch(_sparse_mla_bwd_kernel, T, B, H, BH, BK, (H, K, Dqk, d_v, q.dtype),
            q, kv, indices, dout, lse.contiguous(), delta.contiguous(), dq, dkv, T, S, H, K, Dqk, d_v,
            sm_scale, sm_scale * LOG2E, HAS_TAIL=Dqk > d_v, PRECISION=_precision(q.dtype),
            BV=BV, BR=BR, num_warps=num_warps)
    return dq.to(q.dtype), dkv.to(kv.dtype)


def sparse_mla_attention_triton(q, kv, indices, sm_scale: float, d_v: int, return_probs: bool = False):
    """Same contract as `dsarl.kernels.sparse_mla_attention` (see reference.py).

    q [B, T, H, Dqk], kv [B, S, Dqk], indices [B, T, K] int (-1 = none, else in [0, S)), d_v <= Dqk.
    Returns out [B, T, H, d_v] (q.dtype), lse [B, T, H] fp32 and optionally probs [B, T, K] fp32
    (not differentiable). Gradients flow into q and kv (and honour a gradient on lse).
    """
    B, T, H, Dqk = q.shape
    if kv.dim() != 3 or kv.shape[0] != B or kv.shape[2] != Dqk:
        raise ValueError(f"kv: expected [B={B}, S, Dqk={Dqk}], got {tuple(kv.shape)}")
    if indices.dim() != 3 or indices.shape[:2] != (B, T):
        raise ValueError(f"indices: expected [B={B}, T={T}, K], got {tuple(indices.shape)}")
    if not 0 < d_v <= Dqk:
        raise ValueError(f"d_v={d_v}: expected 0 < d_v <= Dqk={Dqk}")
    if kv.dtype != q.dtype:
        raise ValueError(f"kv.dtype={kv.dtype} differs from q.dtype={q.dtype}")
    if not math.isfinite(sm_scale):
        raise ValueError(f"sm_scale={sm_scale} is not finite")
    return sparse_mla_autograd(sparse_mla_fwd, sparse_mla_bwd, q, kv, indices, sm_scale, d_v, return_probs)
