"""Sparse MLA attention through the C kernel of cpu.c: the CPU path for fp32 when a C compiler exists.

Same contract and maths as reference.py (the backward recomputes from q, kv, indices,
out, lse). Rows of queries are split over up to torch.get_num_threads() threads (one for small calls,
native.thread_count); each thread's backward adds its kv gradient into its own buffer and the buffers
are summed, so results do not depend on thread timing. dispatch.py chooses this backend
when the library loads (a C compiler, DSARL_NATIVE not 0).
"""
import ctypes

import torch

from .. import native
from .function import sparse_mla_autograd

SOURCE = native.source("sparse_mla/cpu.c")
_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {"sparse_mla_fwd_parts": [_P] * 7 + [_I64] * 9 + [_F32],
              "sparse_mla_bwd_parts": [_P] * 8 + [_I64, _P] + [_I64] * 8 + [_F32], "native_openmp": []}


def _lib():
    return native.require(SOURCE, SIGNATURES)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise MemoryError(f"sparse_mla {what}: the C kernel could not allocate its scratch rows")


def sparse_mla_cpu_fwd(q, kv, indices, sm_scale, d_v, return_probs):
    lib = _lib()
    B, T, H, D = q.shape
    S, K = kv.shape[1], indices.shape[-1]
    qc, kvc = q.float().contiguous(), native.batch_strided(kv.float())  # a decode step's cache view: no copy
    idx = indices.to(torch.int32).contiguous()
    out = torch.empty((B, T, H, d_v), dtype=torch.float32)
    lse = torch.empty((B, T, H), dtype=torch.float32)
    probs = torch.empty((B, T, K), dtype=torch.float32) if return_probs else None

    def call(bounds, part0, parts):
        return lib.sparse_mla_fwd_parts(native.ptr(qc), native.batch_ptr(kvc), native.ptr(idx), native.ptr(out),
                                        native.ptr(lse), native.ptr(probs), native.ptr(bounds), part0, parts, T, S, H,
                                        K, D, d_v, kvc.stride(0), sm_scale)

    _check(native.run_parts(lib, call, B * T, native.thread_count(B * T, H * K * D)), "fwd")
    return out.to(q.dtype), lse, probs


def sparse_mla_cpu_bwd(q, kv, indices, out, lse, dout, dlse, sm_scale, d_v):
    lib = _lib()
    B, T, H, D = q.shape
    S, K = kv.shape[1], indices.shape[-1]
    qc, kvc = q.float().contiguous(), kv.float().contiguous()
    idx = indices.to(torch.int32).contiguous()
    doutc = dout.float().contiguous()
    delta = (out.float() * doutc).sum(-1)  # [B, T, H] rowsum(O * dO)
    if dlse is not None:
        delta = delta - dlse.float()  # d lse / d score = p: the same (dP - delta) form
    delta = delta.contiguous()
    lsec = lse.float().contiguous()
    dq = torch.empty((B, T, H, D), dtype=torch.float32)
    threads = native.thread_count(B * T, 3 * H * K * D)
    parts = max(1, len(native.split_rows(B * T, threads)))
    dkv_parts = torch.zeros((parts, B * S, D), dtype=torch.float32)  # part p adds into dkv_parts[p]

    def call(bounds, part0, n_parts):
        return lib.sparse_mla_bwd_parts(native.ptr(qc), native.ptr(kvc), native.ptr(idx), native.ptr(lsec),
                                        native.ptr(doutc), native.ptr(delta), native.ptr(dq), native.ptr(dkv_parts),
                                        B * S * D, native.ptr(bounds), part0, n_parts, T, S, H, K, D, d_v, sm_scale)

    _check(native.run_parts(lib, call, B * T, threads), "bwd")
    dkv = dkv_parts[0]
    for extra in dkv_parts[1:]:
        dkv += extra
    return dq.to(q.dtype), dkv.view(B, S, D).to(kv.dtype)


def sparse_mla_attention_cpu(q, kv, indices, sm_scale: float, d_v: int, return_probs: bool = False):
    """Same contract as `dsarl.kernels.sparse_mla_attention`; fp32 maths (bf16 inputs are upcast)."""
    return sparse_mla_autograd(sparse_mla_cpu_fwd, sparse_mla_cpu_bwd, q, kv, indices, sm_scale, d_v, return_probs)
