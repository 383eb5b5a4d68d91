"""Memory-bounded sparse MLA attention in plain torch: the CPU path at long context.

The reference gathers kv rows for every (query, selected key) at once, [B, T, K, Dqk], and autograd
keeps it: 16k x 256 x 576 x 4 B = 9.6 GB. Here queries are processed in chunks of c rows, so the
gathered block is [B, c, K, Dqk]; the backward recomputes each chunk's gather and probabilities from
the saved (q, kv, indices, out, lse), exactly as the Triton backward does, and scatter-adds the
per-row kv gradient with index_add_. Peak extra memory is O(B * c * K * (Dqk + H)), independent of T.
Maths and results are the reference's (reference.py); queries with no selected key get out = 0,
lse = -inf and zero gradients.

Speed on CPU (profiled at T = 16k, K = 256, H = 6, Dqk = 160, bench/prefill.py): the work is batched
[H, Dqk] x [Dqk, K] products, which run near the GEMM rate only while the gathered block stays in
cache, so chunks are small (~2 MB gathered, ~12 queries). The backward stacks what shares an operand:
[q ; dout] against the gathered rows gives scores and dP in one product, and [p ; ds] against
[dout ; q] gives the value and key parts of the row gradient in one product (dout zero-padded to Dqk).
"""
import functools

import torch

from .function import sparse_mla_autograd

CHUNK_ELEMENTS = 1 << 19  # gathered floats per chunk (2 MB fp32): cache-resident, still a useful GEMM


def _chunk_rows(B: int, K: int, D: int, H: int, chunk: int | None) -> int:
    if chunk is not None:
        return max(1, chunk)
    return max(1, CHUNK_ELEMENTS // max(1, B * K * (D + H)))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # fp32 maths, fp64 for gradcheck


def _flat_rows(indices: torch.Tensor, S: int) -> torch.Tensor:
    """indices [B, T, K] (-1 allowed) -> rows of kv.view(B * S, D), [B, T, K] int64 (-1 -> row 0 of b)."""
    offsets = torch.arange(indices.shape[0], device=indices.device)[:, None, None] * S
    return indices.clamp(min=0).long() + offsets


def _gather(kv_flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """rows [B, c, K] -> [B*c, K, D]. index_select on [B*S, D] is several times faster on CPU than
    gather with an expanded index."""
    return kv_flat.index_select(0, rows.reshape(-1)).view(-1, rows.shape[-1], kv_flat.shape[-1])


def _masked_scores(s: torch.Tensor, valid: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """s [N, H, K] raw q.kv in place -> scaled scores with -inf on unselected (-1) slots; valid [N, K]."""
    return s.mul_(sm_scale).masked_fill_(~valid[:, None, :], float("-inf"))


def sparse_mla_chunked_fwd(q, kv, indices, sm_scale, d_v, return_probs, chunk=None):
    B, T, H, D = q.shape
    S, K = kv.shape[1], indices.shape[-1]
    c = _chunk_rows(B, K, D, H, chunk)
    ct = _compute_dtype(q)
    out = torch.empty((B, T, H, d_v), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, T, H), device=q.device, dtype=ct)
    probs = torch.empty((B, T, K), device=q.device, dtype=ct) if return_probs else None
    kvf = kv.to(ct).reshape(B * S, D)  # [B*S, D]
    qc_all, rows_all, valid_all = q.to(ct), _flat_rows(indices, S), indices >= 0
    for t0 in range(0, T, c):
        t1 = min(T, t0 + c)
        n = B * (t1 - t0)
        kv_sel = _gather(kvf, rows_all[:, t0:t1])  # [n, K, D]
        s = torch.bmm(qc_all[:, t0:t1].reshape(n, H, D), kv_sel.transpose(1, 2))  # [n, H, K]
        s = _masked_scores(s, valid_all[:, t0:t1].reshape(n, K), sm_scale)
        m = torch.logsumexp(s, dim=-1)  # [n, H]
        p = s.sub_(m[..., None].clamp(min=-1e30)).exp_()  # empty rows: exp(-inf) = 0
        out[:, t0:t1] = torch.bmm(p, kv_sel[..., :d_v]).view(B, t1 - t0, H, d_v)
        lse[:, t0:t1] = m.view(B, t1 - t0, H)
        if return_probs:
            probs[:, t0:t1] = p.sum(dim=1).view(B, t1 - t0, K)
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
    dout_padded = torch.nn.functional.pad(dout.to(ct), (0, D - d_v))  # [B, T, H, D]: zero key tail
    q_do = torch.cat([q.to(ct), dout_padded], dim=2)  # [B, T, 2H, D]
    rows_all, valid_all = _flat_rows(indices, S), indices >= 0
    for t0 in range(0, T, c):
        t1 = min(T, t0 + c)
        n = B * (t1 - t0)
        rows = rows_all[:, t0:t1]  # [B, c, K]; -1 entries gather row 0 and add zeros back to it
        kv_sel = _gather(kvf, rows)  # [n, K, D]
        q_do_c = q_do[:, t0:t1].reshape(n, 2 * H, D)
        s_dp = torch.bmm(q_do_c, kv_sel.transpose(1, 2))  # [n, 2H, K]
        s = _masked_scores(s_dp[:, :H], valid_all[:, t0:t1].reshape(n, K), sm_scale)
        p = s.sub_(lse[:, t0:t1].reshape(n, H, 1).clamp(min=-1e30)).exp_()  # p, in the top half
        ds = s_dp[:, H:].sub_(delta[:, t0:t1].reshape(n, H, 1)).mul_(p).mul_(sm_scale)  # scaled dL/ds
        dq[:, t0:t1] = torch.bmm(ds, kv_sel).view(B, t1 - t0, H, D)
        do_q_c = torch.cat([q_do_c[:, H:], q_do_c[:, :H]], dim=1)  # [dout ; q]: pairs with [p ; ds]
        dsel = torch.bmm(s_dp.transpose(1, 2), do_q_c)  # [n, K, D]
        dkv.index_add_(0, rows.reshape(-1), dsel.view(-1, D))
    return dq.to(q.dtype), dkv.view(B, S, D).to(kv.dtype)


def sparse_mla_attention_chunked(q, kv, indices, sm_scale: float, d_v: int, return_probs: bool = False,
                                 chunk: int | None = None):
    """Same contract as `dsarl.kernels.sparse_mla_attention`; `chunk` = query rows per chunk
    (default: about CHUNK_ELEMENTS gathered floats per chunk)."""
    return sparse_mla_autograd(functools.partial(sparse_mla_chunked_fwd, chunk=chunk),
                               functools.partial(sparse_mla_chunked_bwd, chunk=chunk),
                               q, kv, indices, sm_scale, d_v, return_probs)
