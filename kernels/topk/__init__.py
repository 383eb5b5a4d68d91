import torch

from ..dispatch import forced_backend, use_triton
from ..indexer_scores import indexer_scores
from ..indexer_scores.reference import resolve_positions
from . import cpu
from .float_first import topk_indices_float_first
from .keyed import topk_indices_keyed
from .reference import topk_indices_reference


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, T, S] fp32 (-inf = not visible) -> int32 [B, T, k], best first, -1 padded."""
    if use_triton(scores):
        from .triton import topk_indices_triton

        return topk_indices_triton(scores, k)
    if scores.device.type == "cpu" and scores.dtype == torch.float32 and cpu.available():
        return cpu.topk_indices_cpu(scores, k)  # per row in C: sampled threshold, then a radix sort
    return topk_indices_float_first(scores, k)  # the reference's selection: float topk, keyed on boundary ties


@torch.no_grad()
def indexer_topk(q, w, k, topk: int, q_pos=None, k_pos=None, k_scale=None, chunk: int = 1024):
    """Scores and selection fused per chunk of queries: memory O(chunk * S), never O(T * S).

    Same arguments as `indexer_scores`; returns int32 indices [B, T, topk] (-1 padded). On CPU the
    C kernel (cpu.c) fuses both per query row instead, when a compiler exists (not for fp64).
    """
    B, T = q.shape[:2]
    S = k.shape[1]
    q_pos, k_pos = resolve_positions(B, T, S, q.device, q_pos, k_pos)
    if q.device.type == "cpu" and q.dtype != torch.float64 and forced_backend() is None and cpu.available():
        return cpu.indexer_topk_cpu(q, w, k, topk, q_pos, k_pos, k_scale)  # scores never leave the C row buffer
    out = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        # On CUDA the Triton scores skip masked tiles, and reading s1 would sync the stream per chunk
        s1 = S if q.is_cuda else _visible_prefix(q_pos[:, t0:t1], k_pos)
        scores = indexer_scores(q[:, t0:t1], w[:, t0:t1], k[:, :s1], q_pos[:, t0:t1], k_pos[:, :s1],
                                None if k_scale is None else k_scale[:, :s1])
        out.append(topk_indices(scores, topk))
    return torch.cat(out, dim=1)


def _visible_prefix(q_pos: torch.Tensor, k_pos: torch.Tensor) -> int:
    """Key slots [0, s1) hold every key some query of the chunk can see. In causal prefill a chunk of
    queries sees only the keys up to its last position: scoring the rest (all -inf) doubled the cost."""
    visible = (k_pos >= 0) & (k_pos <= q_pos.max(dim=1, keepdim=True).values)  # [B, S]
    slots = torch.arange(1, k_pos.shape[1] + 1, device=k_pos.device)
    return max(1, int((visible * slots).max()))


__all__ = ["topk_indices", "indexer_topk", "topk_indices_float_first", "topk_indices_keyed", "topk_indices_reference"]
