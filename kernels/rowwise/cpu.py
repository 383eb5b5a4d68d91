"""RMSNorm and SwiGLU's product through the C kernels of cpu.c, with their backward: the CPU path.

fp32 maths; other dtypes are computed in fp32 and rounded once to the input's dtype (RMSNorm's reference
does the same; a bf16 SwiGLU product rounds once instead of after silu and again after the multiply).
SwiGLU on bf16 gate and up (a bf16 learner's autocast matmuls, a bf16 sampler) reads and writes bf16 in
the kernel, and keeps its inputs for the backward in bf16: the same bits as widening to fp32 and rounding
the results (tests/kernels/test_rowwise.py), without the fp32 copies (at 8 x 4000 tokens, four of
[32k, 896] per layer: 0.46 GB written, and twice the saved activations).
Rows are split over torch's threads once a part has ELEMENTS_PER_THREAD elements (torch's own grain size
for elementwise ops): a decode step's [64, 256] norm runs on the caller's thread.
"""
import ctypes

import torch

from .. import native

SOURCE = native.source("rowwise/cpu.c")
_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {"rms_norm_fwd_parts": [_P] * 5 + [_I64] * 3 + [_F32],
              "rms_norm_bwd_parts": [_P] * 7 + [_I64] * 3,
              "swiglu_fwd_parts": [_P] * 4 + [_I64] * 3,
              "swiglu_bwd_parts": [_P] * 6 + [_I64] * 3,
              "swiglu_fwd_bf16_parts": [_P] * 4 + [_I64] * 3,
              "swiglu_bwd_bf16_parts": [_P] * 6 + [_I64] * 3, "native_openmp": []}
ELEMENTS_PER_THREAD = 1 << 15


def _lib():
    return native.require(SOURCE, SIGNATURES)


def _threads(rows: int, width: int) -> int:
    return native.thread_count(rows, width, min_work=ELEMENTS_PER_THREAD)


def _rms_norm_fwd(x: torch.Tensor, w: torch.Tensor, eps: float, keep_rstd: bool):
    """x [N, D] fp32 contiguous -> (y [N, D], rstd [N] | None)."""
    lib = _lib()
    N, D = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(N, dtype=torch.float32) if keep_rstd else None

    def call(bounds, part0, parts):
        return lib.rms_norm_fwd_parts(native.ptr(x), native.ptr(w), native.ptr(y), native.ptr(rstd),
                                      native.ptr(bounds), part0, parts, D, eps)

    native.run_parts(lib, call, N, _threads(N, D))
    return y, rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps):
        y, rstd = _rms_norm_fwd(x, w, eps, keep_rstd=True)
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, rstd = ctx.saved_tensors
        lib = _lib()
        N, D = x.shape
        dy = dy.float().contiguous()
        dx = torch.empty_like(x)
        threads = _threads(N, D)
        dw = torch.zeros(threads, D, dtype=torch.float32)  # one row per part

        def call(bounds, part0, parts):
            return lib.rms_norm_bwd_parts(native.ptr(x), native.ptr(w), native.ptr(rstd), native.ptr(dy),
                                          native.ptr(dx), native.ptr(dw), native.ptr(bounds), part0, parts, D)

        native.run_parts(lib, call, N, threads)
        return dx, dw.sum(0), None


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as `dsarl.kernels.rms_norm`."""
    shape, D = x.shape, x.shape[-1]
    x2 = x.reshape(-1, D).float().contiguous()
    w = weight.float().contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        y = _RMSNorm.apply(x2, w, eps)
    else:
        y = _rms_norm_fwd(x2, w, eps, keep_rstd=False)[0]
    y = y.view(shape)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _swiglu_fwd(g: torch.Tensor, u: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """g, u, out: contiguous, all fp32 or all bf16."""
    lib = _lib()
    entry = lib.swiglu_fwd_bf16_parts if g.dtype == torch.bfloat16 else lib.swiglu_fwd_parts
    n = g.shape[-1]
    rows = g.numel() // max(n, 1)

    def call(bounds, part0, parts):
        return entry(native.ptr(g), native.ptr(u), native.ptr(out), native.ptr(bounds), part0, parts, n)

    native.run_parts(lib, call, rows, _threads(rows, n))
    return out


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return _swiglu_fwd(g, u, torch.empty_like(g))

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        lib = _lib()
        entry = lib.swiglu_bwd_bf16_parts if g.dtype == torch.bfloat16 else lib.swiglu_bwd_parts
        n = g.shape[-1]
        rows = g.numel() // max(n, 1)
        dh = dh.to(g.dtype).contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)

        def call(bounds, part0, parts):
            return entry(native.ptr(g), native.ptr(u), native.ptr(dh), native.ptr(dg), native.ptr(du),
                         native.ptr(bounds), part0, parts, n)

        native.run_parts(lib, call, rows, _threads(rows, n))
        return dg, du


def swiglu_cpu(gate: torch.Tensor, up: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Same contract as `dsarl.kernels.swiglu`."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    # bf16 pairs run in bf16; anything else (fp16, mixed dtypes) in fp32, rounded once to gate's dtype
    kind = torch.bfloat16 if gate.dtype == up.dtype == torch.bfloat16 else torch.float32
    g, u = gate.to(kind).contiguous(), up.to(kind).contiguous()
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        h = _SwiGLU.apply(g, u)
        return h if h.dtype == gate.dtype else h.to(gate.dtype)
    # without autograd: over gate's own buffer when it is contiguous in the kernel's dtype (inplace asks for that)
    out = g if (inplace and g.data_ptr() == gate.data_ptr()) else torch.empty_like(g)
    _swiglu_fwd(g, u, out)
    return out if out.dtype == gate.dtype else out.to(gate.dtype)
