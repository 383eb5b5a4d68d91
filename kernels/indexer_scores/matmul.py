"""Indexer scores as batched matmuls over cache-sized tiles: the op's CPU backend (plain torch).

    logits = q[B, Tq*H, D] @ k[B, D, Sk]         -> ReLU in place          (one tile of Tq queries, Sk keys)
    scores = w[B*Tq, 1, H] @ logits[B*Tq, H, Sk] (the weighted head sum as a batched mat-vec)
Same maths as reference.py, without its [B, T, S, H] broadcast temporary and head-last reduction,
which dominate the reference's time on CPU (profiled: the elementwise mul and sum over H). With
D = 32 each logit costs only 32 multiply-adds, so an untiled [T*H, S] logits tensor makes the product
memory-bound (writing and re-reading it); tiles of QUERY_TILE x KEY_TILE keep the logits (4 MB)
in cache. bench/kernels.py times it against the reference.
"""
import torch

from .reference import resolve_positions, visibility

QUERY_TILE, KEY_TILE = 256, 1024


def indexer_scores_matmul(q, w, k, q_pos=None, k_pos=None, k_scale=None) -> torch.Tensor:
    B, T, H, D = q.shape
    S = k.shape[1]
    q_pos, k_pos = resolve_positions(B, T, S, q.device, q_pos, k_pos)
    qf, wf, kt = q.float(), w.float(), k.float().transpose(1, 2)  # kt [B, D, S]
    scores = torch.empty((B, T, S), device=q.device, dtype=torch.float32)
    for t0 in range(0, T, QUERY_TILE):
        t1 = min(T, t0 + QUERY_TILE)
        n = t1 - t0
        q_tile = qf[:, t0:t1].reshape(B, n * H, D)
        w_tile = wf[:, t0:t1].reshape(B * n, 1, H)
        for s0 in range(0, S, KEY_TILE):
            s1 = min(S, s0 + KEY_TILE)
            logits = torch.bmm(q_tile, kt[:, :, s0:s1]).relu_()  # [B, n*H, s1-s0]
            scores[:, t0:t1, s0:s1] = torch.bmm(w_tile, logits.view(B * n, H, s1 - s0)).view(B, n, s1 - s0)
    if k_scale is not None:
        scores = scores * k_scale.float()[:, None, :]
    return scores.masked_fill_(~visibility(q_pos, k_pos), float("-inf"))
