"""Dense MLA attention (absorbed form) on the CPU: the sparse MLA C kernel over every visible key.

Dense attention is sparse attention whose selection is all of 0 <= k_pos[s] <= q_pos[t]: the index
rows are the key slots themselves (-1 where hidden), so probs come out in slot order, as the reference
gives them. The C kernel reads each key row once for all heads and runs the softmax over contiguous
arrays; the reference's einsums materialise [B, T, H, S] scores and make a batched GEMM of M = H rows
per query. Same contract and maths as reference.py; fp32 maths, differentiable (the sparse kernel's
backward).
"""
import torch

from ..indexer_scores.reference import resolve_positions, visibility
from ..sparse_mla.cpu import sparse_mla_attention_cpu


def visible_slots(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[B, T] x [B, S] -> int32 [B, T, S]: slot s where key s is visible to query t, else -1."""
    S = k_pos.shape[1]
    slots = torch.arange(S, dtype=torch.int32, device=k_pos.device)
    return torch.where(visibility(q_pos, k_pos), slots, -1).to(torch.int32)


# The last call's positions and slots: every layer of a forward passes the same position tensors (a KV
# cache hands each layer the same k_pos), so the layers after the first reuse the slots.
_last: tuple | None = None
KEEP_SLOTS_MAX = 1 << 22  # int32 entries (16 MB)


def _slots_of(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    global _last
    last = _last  # the same tensors, not changed in place since
    if (last is not None and last[0] is q_pos and last[1] == q_pos._version and last[2] is k_pos
            and last[3] == k_pos._version):
        return last[4]
    slots = visible_slots(q_pos, k_pos)
    # never hold a long prefill's mask
    _last = (q_pos, q_pos._version, k_pos, k_pos._version, slots) if slots.numel() <= KEEP_SLOTS_MAX else None
    return slots


def dense_mla_attention_cpu(q, kv, sm_scale: float, d_v: int, q_pos=None, k_pos=None, return_probs: bool = False):
    """Same contract as `dsarl.kernels.dense_mla_attention`."""
    B, T = q.shape[:2]
    if q_pos is None or k_pos is None:
        q_pos, k_pos = resolve_positions(B, T, kv.shape[1], q.device, q_pos, k_pos)
        slots = visible_slots(q_pos, k_pos)
    else:
        slots = _slots_of(q_pos, k_pos)
    return sparse_mla_attention_cpu(q, kv, slots, sm_scale, d_v, return_probs)
