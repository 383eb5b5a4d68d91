"""Indexer KL loss in Triton (DSA paper eqs. 3 and 4), forward and backward into the scores.

One program per query row streams its K candidates in BK blocks, so K may be the selected set
(2048) or every visible key (the dense warm-up, K = S up to 64k) without holding the row at once:
- forward pass 1: online max / sum of exp of the valid scores (-> lse) and the target mass P;
- forward pass 2: kl_t = sum_{valid, p > 0} p (log p - (I - lse)) with p = target / P;
- backward: dI[t, s] = g / n * (softmax(I_t)[s] * [P > 0] - p[t, s]) on valid entries, 0 elsewhere,
  where n is the number of rows with at least one valid key (the mean's denominator).
The per-row lse and P are saved by the forward, so the backward is one streaming pass.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _indexer_kl_fwd_kernel(
    target,  # [N, K] fp32
    scores,  # [N, K] fp32
    valid,  # [N, K] int8
    kl,  # [N] fp32
    lse,  # [N] fp32
    mass,  # [N] fp32 target mass over the valid entries
    has,  # [N] fp32, 1 if the row has a valid key
    K,
    BK: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    b_m = tl.full([BK], float("-inf"), dtype=tl.float32)  # per-lane running max
    b_l = tl.zeros([BK], dtype=tl.float32)
    b_mass = tl.zeros([BK], dtype=tl.float32)
    b_cnt = tl.zeros([BK], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_v = (tl.load(valid + i_n * K + o_k, mask=m_k, other=0) != 0) & m_k
        b_s = tl.load(scores + i_n * K + o_k, mask=m_v, other=float("-inf"))
        b_t = tl.load(target + i_n * K + o_k, mask=m_v, other=0.0)
        b_mn = tl.maximum(b_m, b_s)
        b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_l = b_l * tl.exp(b_m - b_ms) + tl.exp(b_s - b_ms)
        b_m = b_mn
        b_mass += b_t
        b_cnt += m_v.to(tl.float32)
    b_mx = tl.max(b_m, axis=0)
    b_mxs = tl.where(b_mx == float("-inf"), 0.0, b_mx)
    b_sum = tl.sum(b_l * tl.exp(b_m - b_mxs), axis=0)
    b_lse = tl.where(b_sum > 0, b_mxs + tl.log(tl.where(b_sum > 0, b_sum, 1.0)), float("-inf"))
    b_P = tl.maximum(tl.sum(b_mass, axis=0), 1e-30)
    b_lss = tl.where(b_lse == float("-inf"), 0.0, b_lse)  # empty row: keep inf * 0 out of the masked lanes

    b_kl = tl.zeros([BK], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_v = (tl.load(valid + i_n * K + o_k, mask=m_k, other=0) != 0) & m_k
        b_s = tl.load(scores + i_n * K + o_k, mask=m_v, other=0.0)
        b_p = tl.load(target + i_n * K + o_k, mask=m_v, other=0.0) / b_P
        m_p = m_v & (b_p > 0)
        b_kl += tl.where(m_p, b_p * (tl.log(tl.where(m_p, b_p, 1.0)) - (b_s - b_lss)), 0.0)
    b_has = tl.sum(b_cnt, axis=0) > 0
    tl.store(kl + i_n, tl.where(b_has, tl.sum(b_kl, axis=0), 0.0))
    tl.store(lse + i_n, b_lse)
    tl.store(mass + i_n, tl.sum(b_mass, axis=0))
    tl.store(has + i_n, b_has.to(tl.float32))


@triton.jit
def _indexer_kl_bwd_kernel(
    target,  # [N, K] fp32
    scores,  # [N, K] fp32
    valid,  # [N, K] int8
    lse,  # [N] fp32
    mass,  # [N] fp32
    dscores,  # [N, K] fp32
    g_scale,  # dloss / n_rows, a float
    K,
    BK: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    b_lse = tl.load(lse + i_n)
    b_lse = tl.where(b_lse == float("-inf"), 0.0, b_lse)
    b_mass = tl.load(mass + i_n)
    b_P = tl.maximum(b_mass, 1e-30)
    b_on = tl.where(b_mass > 0, 1.0, 0.0)  # the loss's target sums to 1, or is empty
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_v = (tl.load(valid + i_n * K + o_k, mask=m_k, other=0) != 0) & m_k
        b_s = tl.load(scores + i_n * K + o_k, mask=m_v, other=0.0)
        b_p = tl.load(target + i_n * K + o_k, mask=m_v, other=0.0) / b_P
        b_q = tl.exp(b_s - b_lse)
        b_g = tl.where(m_v, g_scale * (b_q * b_on - b_p), 0.0)
        tl.store(dscores + i_n * K + o_k, b_g, mask=m_k)


def _prep(target, scores, valid):
    K = scores.shape[-1]
    if valid is None:
        valid = torch.isfinite(scores)
    flat = lambda x: x.reshape(-1, K)  # noqa: E731  [N, K]
    return flat(target.detach().float()).contiguous(), flat(scores.float()).contiguous(), \
        flat(valid).to(torch.int8).contiguous()


def _block(K: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(K)))


class IndexerKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, target, scores, valid):
        t, s, v = _prep(target, scores, valid)
        N, K = s.shape
        kl, lse, mass, has = (torch.full((N,), float("nan"), device=s.device) for _ in range(4))
        _indexer_kl_fwd_kernel[(N,)](t, s, v, kl, lse, mass, has, K, BK=_block(K))
        n_rows = has.sum().clamp(min=1)
        ctx.save_for_backward(t, s, v, lse, mass, n_rows)
        ctx.shape, ctx.dtype = scores.shape, scores.dtype
        return kl.sum() / n_rows

    @staticmethod
    def backward(ctx, g):
        t, s, v, lse, mass, n_rows = ctx.saved_tensors
        N, K = s.shape
        ds = torch.full_like(s, float("nan"))
        g_scale = float(g) / float(n_rows)
        _indexer_kl_bwd_kernel[(N,)](t, s, v, lse, mass, ds, g_scale, K, BK=_block(K))
        return None, ds.view(ctx.shape).to(ctx.dtype), None


def indexer_kl_loss_triton(target, scores, valid=None):
    """Same contract as `dsarl.kernels.indexer_kl_loss` (see reference.py); gradient into scores only."""
    if target.shape != scores.shape:
        raise ValueError(f"target {tuple(target.shape)} and scores {tuple(scores.shape)} differ in shape")
    if valid is not None and valid.shape != scores.shape:
        raise ValueError(f"valid {tuple(valid.shape)} differs from scores {tuple(scores.shape)}")
    return IndexerKLFunction.apply(target, scores, valid)
