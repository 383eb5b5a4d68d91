"""Top-k on the float scores first; the keyed tie-break only where the boundary is tied.

The selected set is unique unless the k-th and (k+1)-th best finite scores are equal; only then does
the recency rule of reference.py decide which tied keys are in. So: torch.topk(k + 1) over the fp32
scores, and the keyed selection (keyed.py, which packs score and slot into an int64 key) re-run on
just the rows whose boundary ties. Same contract and same selected sets as the reference; order
within the set is by score (ties in any order).

Long rows are first pruned by blocks of BLOCK keys: with tau the (k+1)-th largest block maximum, at
least k+1 scores are >= tau, so every score above tau lies in one of the k+1 blocks whose maximum is
>= tau (each score's block has a maximum >= the score). The topk then runs over those (k+1) * BLOCK
candidates plus the ragged tail. A row whose k-th candidate is not above tau may have
tied scores outside the candidates, so it goes to the keyed path with the boundary-tied rows.

CPU, [1024, 16384], k = 256 (2 cores): keyed 0.17 s, float topk 0.08 s, pruned 0.05 s.
"""
import torch

from .keyed import topk_indices_keyed

BLOCK = 8
MIN_BLOCKS_PER_PICK = 4  # prune only when it keeps at most a quarter of the row


def topk_indices_float_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Same contract as `topk_indices_reference`: scores [B, T, S] fp32 (-inf = not visible) -> int32
    [B, T, k], best first, -1 where fewer than k keys are visible."""
    B, T, S = scores.shape
    if S <= k:  # every key is selected or padded: nothing to break ties over
        return topk_indices_keyed(scores, k)
    rows = scores.reshape(B * T, S)
    n_blocks = S // BLOCK
    if n_blocks >= MIN_BLOCKS_PER_PICK * (k + 1):
        cand, slots, tau = _block_candidates(rows, k, n_blocks)
    else:
        cand, slots, tau = rows, None, None
    values, top = cand.topk(k + 1, dim=-1)  # [N, k+1], best first
    if slots is not None:
        top = slots.gather(1, top)
    idx = top[:, :k].to(torch.int32).masked_fill_(torch.isneginf(values[:, :k]), -1)
    kth = values[:, k - 1]
    redo = kth == values[:, k]  # tied at the boundary: recency decides
    if tau is not None:
        redo |= kth <= tau  # a score equal to tau may lie outside the candidates
    redo &= torch.isfinite(kth)  # fewer than k visible keys: all are selected, no tie to break
    if redo.any():
        idx[redo] = topk_indices_keyed(rows[redo][None], k)[0]
    return idx.view(B, T, k)


def _block_candidates(rows: torch.Tensor, k: int, n_blocks: int):
    """rows [N, S] -> (candidate scores [N, C], their slots [N, C] int64, tau [N])."""
    N, S = rows.shape
    full = rows[:, : n_blocks * BLOCK].view(N, n_blocks, BLOCK)
    block_max, block = full.amax(dim=-1).topk(k + 1, dim=-1, sorted=False)  # [N, k+1]
    tau = block_max.amin(dim=-1)  # the (k+1)-th largest block maximum
    cand = full.gather(1, block[:, :, None].expand(N, k + 1, BLOCK)).view(N, -1)  # [N, (k+1)*BLOCK]
    slots = (block[:, :, None] * BLOCK + torch.arange(BLOCK, device=rows.device)).view(N, -1)
    tail = n_blocks * BLOCK
    if tail < S:  # the ragged last keys are always candidates
        cand = torch.cat([cand, rows[:, tail:]], dim=1)
        slots = torch.cat([slots, torch.arange(tail, S, device=rows.device).expand(N, S - tail)], dim=1)
    return cand, slots, tau
