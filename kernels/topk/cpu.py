"""Top-k selection through the C kernel of cpu.c: the CPU path for fp32 scores when a C compiler exists.

Same contract and selected sets as reference.py (ties at the k-th score to the later slots), best
first. Rows are split over up to torch.get_num_threads() threads (native.thread_count).
`available()` is False without a compiler (or with DSARL_NATIVE=0); callers then use float_first.py.
"""
import ctypes
from pathlib import Path

import torch

from .. import native

SOURCE = Path(__file__).with_name("cpu.c")


def _lib():
    lib = native.load(SOURCE)
    if lib is None:
        raise RuntimeError(f"the C top-k kernel is unavailable: {native.unavailable_reason(SOURCE)}")
    if not getattr(lib, "_dsarl_typed", False):
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.topk_rows.argtypes = [p, p, i64, i64, i64, i64]
        lib._dsarl_typed = True
    return lib


def available() -> bool:
    return native.load(SOURCE) is not None


def topk_indices_cpu(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, T, S] fp32 (-inf = not visible) -> int32 [B, T, k], best first, -1 padded."""
    lib = _lib()
    B, T, S = scores.shape
    rows = scores.float().contiguous()
    out = torch.empty((B, T, k), dtype=torch.int32)

    def run(_, n0, n1):
        if lib.topk_rows(native.ptr(rows), native.ptr(out), n0, n1, S, k) != 0:
            raise MemoryError("topk: the C kernel could not allocate its heap")

    native.parallel(run, B * T, native.thread_count(B * T, S))
    return out
