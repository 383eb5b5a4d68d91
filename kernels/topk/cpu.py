"""Top-k selection and the fused indexer + top-k through the C kernels of cpu.c: the CPU backend.

Same contract and selected sets as reference.py (ties at the k-th score to the later slots), best
first; scores in fp32. Rows are split over up to torch.get_num_threads() threads (native.thread_count).
dispatch.py chooses these when the library loads (a C compiler, DSARL_NATIVE not 0).
"""
import ctypes

import torch

from .. import native
from ..indexer_scores.matmul import indexer_scores_matmul
from ..indexer_scores.reference import resolve_positions

SOURCE = native.source("topk/cpu.c")
KEY_BLOCK = 32  # cpu.c's KB: keys per transposed block
# indexer_topk with at most this many queries per sequence scores by matmul and selects in C (decode);
# measured crossover on 2 cores: equal at T = 128, the fused kernel 3x faster at T = 512
FEW_QUERIES = 64
# a score selected costs about as much as this many multiply-adds (native.thread_count's unit): two
# threads beat one from ~70 k scores (128 rows of 576: 235 us either way; 256 rows: 389 against 681 us)
SELECT_COST = 16
UNFUSED_MAX_SCORES = 1 << 25  # the [B, T, S] fp32 scores it materialises: at most 128 MB


_P, _I64 = ctypes.c_void_p, ctypes.c_int64
SIGNATURES = {"topk_parts": [_P, _P, _P] + [_I64] * 4, "indexer_topk_parts": [_P] * 3 + [_I64] + [_P] * 5 + [_I64] * 7,
              "native_openmp": []}


def _lib():
    return native.require(SOURCE, SIGNATURES)


def topk_indices_cpu(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, T, S] fp32 (-inf = not visible) -> int32 [B, T, k], best first, -1 padded."""
    lib = _lib()
    B, T, S = scores.shape
    rows = scores.float().contiguous()
    out = torch.empty((B, T, k), dtype=torch.int32)

    def call(bounds, part0, parts):
        return lib.topk_parts(native.ptr(rows), native.ptr(out), native.ptr(bounds), part0, parts, S, k)

    if native.run_parts(lib, call, B * T, native.thread_count(B * T, SELECT_COST * S)) != 0:
        raise MemoryError("topk: the C kernel could not allocate its heap")
    return out


def _usable_blocked(k_blocked, B: int, S: int, D: int) -> bool:
    """k_blocked [B, >= S / KEY_BLOCK, D, KEY_BLOCK] fp32 CPU, each batch's blocks contiguous."""
    return (k_blocked is not None and k_blocked.dtype == torch.float32 and k_blocked.device.type == "cpu"
            and k_blocked.dim() == 4 and k_blocked.shape[0] == B and k_blocked.shape[1] * KEY_BLOCK >= S
            and tuple(k_blocked.shape[2:]) == (D, KEY_BLOCK) and k_blocked.stride()[1:] == (D * KEY_BLOCK, KEY_BLOCK, 1))


def indexer_topk_cpu(q, w, k, topk: int, q_pos=None, k_pos=None, k_scale=None, chunk=None,
                     k_blocked=None) -> torch.Tensor:
    """Lightning-indexer scores and their top-k fused per query row (`indexer_topk`'s contract):
    q [B, T, H, D], w [B, T, H], k [B, S, D] (any float dtype, fp32 maths), q_pos [B, T], k_pos [B, S],
    k_scale [B, S] or None -> int32 [B, T, topk]. Memory O(threads * S): no [T, S] score matrix, so
    `chunk` (the reference's queries per chunk) has nothing to bound. `k_blocked`: k already in the
    kernel's layout (a KV cache keeps it), scored where it lies."""
    B, T, H, D = q.shape
    S = k.shape[1]
    blocked = _usable_blocked(k_blocked, B, S, D)
    if not blocked and T <= FEW_QUERIES and B * T * S <= UNFUSED_MAX_SCORES:
        # Decode and short chunks: the fused kernel's cost is its re-layout of every key (a copy of the
        # whole indexer cache, 33 MB per layer and step at 64 x 4k keys), not the scoring. Scores by
        # matmul, then the C top-k: 32 ms -> 4.4 ms per call at B=64, T=1, S=4100, K=256 on 2 cores
        # (bench/kernels.py's indexer_topk rows). Same maths and tie rule; fp32 sums in another order.
        return topk_indices_cpu(indexer_scores_matmul(q, w, k, q_pos, k_pos, k_scale), topk)
    lib = _lib()
    q_pos, k_pos = resolve_positions(B, T, S, q.device, q_pos, k_pos)
    qc, wc = q.float().contiguous(), w.float().contiguous()
    if blocked:
        kT = k_blocked  # its blocks past S hold zeros or stale keys: scored, never visible
    else:
        kb = KEY_BLOCK
        S_pad = -(-S // kb) * kb
        kf = torch.nn.functional.pad(k.float(), (0, 0, 0, S_pad - S))  # zero keys past S: scored, never visible
        kT = kf.view(B, S_pad // kb, kb, D).transpose(2, 3).contiguous()  # [B, S_pad / kb, D, kb]
    ks = None if k_scale is None else k_scale.float().contiguous()
    qp, kp = q_pos.long().contiguous(), k_pos.long().contiguous()
    out = torch.empty((B, T, topk), dtype=torch.int32)

    def call(bounds, part0, parts):
        return lib.indexer_topk_parts(native.ptr(qc), native.ptr(wc), ctypes.c_void_p(kT.data_ptr()), kT.stride(0),
                                      native.ptr(ks), native.ptr(qp), native.ptr(kp), native.ptr(out), native.ptr(bounds),
                                      part0, parts, T, S, H, D, topk)

    threads = native.thread_count(B * T, S * H * D // 2)
    visible = None  # a row's cost is its visible keys (all S unless k_pos is sorted, as in prefill; cpu.c
    if threads > 1 and S > 1:  # visible_end); a decode step runs inline and skips these few torch ops
        visible = torch.where((kp[:, 1:] >= kp[:, :-1]).all(-1, keepdim=True),
                              torch.searchsorted(kp, qp, right=True), S).flatten()
    if native.run_parts(lib, call, B * T, threads, work=visible) != 0:
        raise MemoryError("indexer_topk: the C kernel could not allocate its row buffers")
    return out
