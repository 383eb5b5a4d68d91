"""Lightning-indexer scores, the definition of correctness (DSA paper eq. 1).

    I[b, t, s] = k_scale[b, s] * sum_j w[b, t, j] * ReLU(q[b, t, j] . k[b, s])   for k_pos[s] <= q_pos[t]
    I[b, t, s] = -inf                                                           otherwise
"""
import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 for the maths (bf16/fp8 inputs), but fp64 stays fp64 so gradcheck can run on the references."""
    return x if x.dtype == torch.float64 else x.float()


def default_positions(B: int, T: int, S: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries are the last T of S tokens (training: T == S; decode: T == 1)."""
    q_pos = torch.arange(S - T, S, device=device).expand(B, T)
    k_pos = torch.arange(S, device=device).expand(B, S)
    return q_pos, k_pos


def resolve_positions(B: int, T: int, S: int, device, q_pos=None, k_pos=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The given positions, or the defaults of `default_positions` for the missing ones."""
    if q_pos is None or k_pos is None:
        dq, dk = default_positions(B, T, S, device)
        q_pos = dq if q_pos is None else q_pos
        k_pos = dk if k_pos is None else k_pos
    return q_pos, k_pos


def visibility(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[B, T] x [B, S] -> bool [B, T, S]: key s is visible to query t iff 0 <= k_pos[s] <= q_pos[t]."""
    return (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)


def indexer_scores_reference(
    q: torch.Tensor,  # [B, T, H, D]
    w: torch.Tensor,  # [B, T, H] fp32 head weights (any dequant scale of q already folded in)
    k: torch.Tensor,  # [B, S, D]
    q_pos: torch.Tensor | None = None,  # [B, T] int
    k_pos: torch.Tensor | None = None,  # [B, S] int
    k_scale: torch.Tensor | None = None,  # [B, S] fp32 dequant scale of k
) -> torch.Tensor:
    B, T, H, D = q.shape
    S = k.shape[1]
    q_pos, k_pos = resolve_positions(B, T, S, q.device, q_pos, k_pos)
    logits = torch.einsum("bthd,bsd->btsh", upcast(q), upcast(k))  # [B, T, S, H], fp32 accumulation
    scores = (logits.relu() * upcast(w)[:, :, None, :]).sum(-1)  # [B, T, S]
    if k_scale is not None:
        scores = scores * upcast(k_scale)[:, None, :]
    return scores.masked_fill(~visibility(q_pos, k_pos), float("-inf"))
