"""Indexer scores as two batched matmuls, the CPU path (and the fallback on GPUs without Triton).

    logits = q[B, T*H, D] @ k[B, D, S]        -> ReLU in place
    scores = w[B*T, 1, H] @ logits[B*T, H, S] (the weighted head sum as a batched mat-vec)
Same maths as reference.py, without its [B, T, S, H] broadcast temporary and head-last reduction,
which dominate the reference's time on CPU (profiled: the elementwise mul and sum over H).
"""
import torch

from .reference import resolve_positions, visibility


def indexer_scores_matmul(q, w, k, q_pos=None, k_pos=None, k_scale=None) -> torch.Tensor:
    B, T, H, D = q.shape
    S = k.shape[1]
    q_pos, k_pos = resolve_positions(B, T, S, q.device, q_pos, k_pos)
    logits = torch.bmm(q.float().reshape(B, T * H, D), k.float().transpose(1, 2)).relu_()  # [B, T*H, S]
    scores = torch.bmm(w.float().reshape(B * T, 1, H), logits.view(B * T, H, S)).view(B, T, S)
    if k_scale is not None:
        scores = scores * k_scale.float()[:, None, :]
    return scores.masked_fill_(~visibility(q_pos, k_pos), float("-inf"))
