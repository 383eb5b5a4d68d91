"""indexer_topk by its definition: index scores, then their top-k, per chunk of queries.

Memory O(chunk * S), never O(T * S). Each step goes through the public ops' dispatch, so this is the
reference path under DSARL_KERNELS=reference and Triton scores + reference top-k on CUDA; on CPU the
C kernel (cpu.py) fuses both per query row instead.
"""
import torch

from .. import dispatch
from ..indexer_scores.reference import resolve_positions


@torch.no_grad()
def indexer_topk_chunked(q, w, k, topk: int, q_pos=None, k_pos=None, k_scale=None, chunk: int = 1024,
                         k_blocked=None):
    """Same contract as `dsarl.kernels.indexer_topk` (k_blocked, a layout hint for the C kernel, unused)."""
    B, T = q.shape[:2]
    S = k.shape[1]
    q_pos, k_pos = resolve_positions(B, T, S, q.device, q_pos, k_pos)
    out = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        # On CUDA the Triton scores skip masked tiles, and reading s1 would sync the stream per chunk
        s1 = S if q.is_cuda else _visible_prefix(q_pos[:, t0:t1], k_pos)
        args = (q[:, t0:t1], w[:, t0:t1], k[:, :s1], q_pos[:, t0:t1], k_pos[:, :s1],
                None if k_scale is None else k_scale[:, :s1])
        scores = dispatch.choose("indexer_scores", q)(*args)  # [B, c, s1] fp32
        out.append(dispatch.choose("topk", scores)(scores, topk))
    return torch.cat(out, dim=1)


def _visible_prefix(q_pos: torch.Tensor, k_pos: torch.Tensor) -> int:
    """Key slots [0, s1) hold every key some query of the chunk can see. In causal prefill a chunk of
    queries sees only the keys up to its last position: scoring the rest (all -inf) doubled the cost."""
    visible = (k_pos >= 0) & (k_pos <= q_pos.max(dim=1, keepdim=True).values)  # [B, S]
    slots = torch.arange(1, k_pos.shape[1] + 1, device=k_pos.device)
    return max(1, int((visible * slots).max()))
