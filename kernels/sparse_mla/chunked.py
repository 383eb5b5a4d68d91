"""Memory-bounded sparse MLA attention in plain torch: the CPU path at long context.

The reference gathers kv rows for every (query, selected key) at once, [B, T, K, Dqk], and autograd
keeps it: 16k x 256 x 576 x 4 B = 9.6 GB. Here queries are processed in chunks of c rows, so the
gathered block is [B, c, K, Dqk]; the backward recomputes each chunk's gather and probabilities from
the saved (q, kv, indices, out, lse), exactly as the Triton backward does, and scatter-adds the
per-row kv gradient with index_add_. Peak extra memory is O(B * c * K * (Dqk + H)), independent of T.
Maths and results are the reference's (reference.py); queries with no selected key get out = 0,
lse = -inf and zero gradients.
"""
import torch

CHUNK_ELEMENTS = 1 << 23  # gathered floats per chunk (32 MB fp32): big enough for BLAS, bounded


def _chunk_rows(B: int, K: int, D: int, H: int, chunk: int | None) -> int:
    if chunk is not None:
        return max(1, chunk)
    return max(1, CHUNK_ELEMENTS // max(1, B * K * (D + H)))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # fp32 maths, fp64 for gradcheck


def _rows(B: int, S: int, idx: torch.Tensor) -> torch.Tensor:
    """indices [B, c, K] (-1 allowed) -> flat rows of kv.view(B * S, D) [B * c * K] (-1 -> row 0 of b)."""
    offsets = torch.arange(B, device=idx.device)[:, None, None] * S  # [B, 1, 1]
    return (idx.clamp(min=0).long() + offsets).reshape(-1)


def _gather(kv_flat: torch.Tensor, rows: torch.Tensor, shape) -> torch.Tensor:
    """index_select on [B*S, D] is several times faster on CPU than gather with an expanded index."""
    return kv_flat.index_select(0, rows).view(*shape, kv_flat.shape[-1])  # [B, c, K, D]


def _probs(q_c, kv_sel, valid, sm_scale):
    """q_c [B, c, H, D], kv_sel [B, c, K, D], valid [B, c, K] -> masked scores [B, c, H, K] fp32."""
    s = torch.matmul(q_c, kv_sel.transpose(-1, -2)) * sm_scale  # [B, c, H, K]
    return s.masked_fill_(~valid[:, :, None, :], float("-inf"))


def sparse_mla_chunked_fwd(q, kv, indices, sm_scale, d_v, return_probs, chunk=None):
    B, T, H, D = q.shape
    K = indices.shape[-1]
    c = _chunk_rows(B, K, D, H, chunk)
    out = torch.empty((B, T, H, d_v), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, T, H), device=q.device, dtype=_compute_dtype(q))
    probs = torch.empty((B, T, K), device=q.device, dtype=_compute_dtype(q)) if return_probs else None
    ct = _compute_dtype(q)
    kvf = kv.to(ct).reshape(B * kv.shape[1], D)  # [B*S, D]
    for t0 in range(0, T, c):
        t1 = min(T, t0 + c)
        idx = indices[:, t0:t1]  # [B, c, K]
        kv_sel = _gather(kvf, _rows(B, kv.shape[1], idx), idx.shape)  # [B, c, K, D]
        s = _probs(q[:, t0:t1].to(ct), kv_sel, idx >= 0, sm_scale)  # [B, c, H, K]
        m = torch.logsumexp(s, dim=-1)  # [B, c, H]
        p = torch.exp(s - m[..., None].clamp(min=-1e30))  # empty rows: exp(-inf) = 0
        out[:, t0:t1] = torch.matmul(p, kv_sel[..., :d_v]).to(q.dtype)  # [B, c, H, d_v]
        lse[:, t0:t1] = m
        if return_probs:
            probs[:, t0:t1] = p.sum(dim=2)  # [B, c, K]
    return out, lse, probs


def sparse_mla_chunked_bwd(q, kv, indices, out, lse, dout, dlse, sm_scale, d_v, chunk=None):
    B, T, H, D = q.shape
    S, K = kv.shape[1], indices.shape[-1]
    c = _chunk_rows(B, K, D, H, chunk)
    ct = _compute_dtype(q)
    kvf = kv.to(ct).reshape(B * S, D)  # [B*S, D]
    dq = torch.empty((B, T, H, D), device=q.device, dtype=ct)
    dkv = torch.zeros((B * S, D), device=q.device, dtype=ct)  # [B*S, D] for index_add_
    delta = (out.to(ct) * dout.to(ct)).sum(-1)  # [B, T, H] rowsum(O * dO)
    if dlse is not None:
        delta = delta - dlse.to(ct)  # d lse / d score = p: same (dP - delta) form
    for t0 in range(0, T, c):
        t1 = min(T, t0 + c)
        idx = indices[:, t0:t1]  # [B, c, K]
        rows = _rows(B, S, idx)  # [B*c*K]; -1 entries gather row 0 and add zeros back to it
        kv_sel = _gather(kvf, rows, idx.shape)  # [B, c, K, D]
        q_c = q[:, t0:t1].to(ct)  # [B, c, H, D]
        s = _probs(q_c, kv_sel, idx >= 0, sm_scale)
        p = torch.exp(s - lse[:, t0:t1, :, None].clamp(min=-1e30))  # [B, c, H, K]
        do_c = dout[:, t0:t1].to(ct)  # [B, c, H, d_v]
        dp = torch.matmul(do_c, kv_sel[..., :d_v].transpose(-1, -2))  # [B, c, H, K]
        ds = p * (dp - delta[:, t0:t1, :, None])  # [B, c, H, K] dL/d(score)
        dq[:, t0:t1] = torch.matmul(ds, kv_sel) * sm_scale  # [B, c, H, D]
        dsel = torch.matmul(ds.transpose(-1, -2), q_c) * sm_scale  # [B, c, K, D] key part
        dsel[..., :d_v] += torch.matmul(p.transpose(-1, -2), do_c)  # value part
        dkv.index_add_(0, rows, dsel.reshape(-1, D))
    return dq.to(q.dtype), dkv.view(B, S, D).to(kv.dtype)


class SparseMLAChunkedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, indices, sm_scale, d_v, return_probs, chunk):
        out, lse, probs = sparse_mla_chunked_fwd(q, kv, indices, sm_scale, d_v, return_probs, chunk)
        ctx.save_for_backward(q, kv, indices, out, lse)
        ctx.sm_scale, ctx.d_v, ctx.chunk = sm_scale, d_v, chunk
        if return_probs:
            ctx.mark_non_differentiable(probs)  # the indexer KL target is detached
            return out, lse, probs
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse, *_):
        q, kv, indices, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dkv = sparse_mla_chunked_bwd(q, kv, indices, out, lse, dout, dlse, ctx.sm_scale, ctx.d_v, ctx.chunk)
        return dq, dkv, None, None, None, None, None


def sparse_mla_attention_chunked(q, kv, indices, sm_scale: float, d_v: int, return_probs: bool = False,
                                 chunk: int | None = None):
    """Same contract as `dsarl.kernels.sparse_mla_attention`; `chunk` = query rows per chunk
    (default: about CHUNK_ELEMENTS gathered floats per chunk)."""
    return SparseMLAChunkedFunction.apply(q, kv, indices, sm_scale, d_v, return_probs, chunk)
