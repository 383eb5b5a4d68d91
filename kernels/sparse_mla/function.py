"""The autograd wrapper every sparse MLA backend shares: save (q, kv, indices, out, lse), recompute in
backward. Backends differ only in their forward and backward functions:

    fwd(q, kv, indices, sm_scale, d_v, return_probs) -> (out, lse, probs or None)
    bwd(q, kv, indices, out, lse, dout, dlse, sm_scale, d_v) -> (dq, dkv)
"""
import torch


class SparseMLARecompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fwd, bwd, q, kv, indices, sm_scale, d_v, return_probs):
        out, lse, probs = fwd(q, kv, indices, sm_scale, d_v, return_probs)
        ctx.save_for_backward(q, kv, indices, out, lse)
        ctx.bwd, ctx.sm_scale, ctx.d_v = bwd, sm_scale, d_v
        if return_probs:
            ctx.mark_non_differentiable(probs)  # probs feed the indexer KL target, which is detached
            return out, lse, probs
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse, *_):
        q, kv, indices, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dkv = ctx.bwd(q, kv, indices, out, lse, dout, dlse, ctx.sm_scale, ctx.d_v)
        return None, None, dq, dkv, None, None, None, None


def sparse_mla_autograd(fwd, bwd, q, kv, indices, sm_scale: float, d_v: int, return_probs: bool):
    """(out, lse[, probs]) from `fwd`, differentiable in q and kv through `bwd`."""
    if not (torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad)):
        # nothing to differentiate (a rollout's decode step): skip the Function's bookkeeping (~7 us a
        # call against ~90 for a whole decode call at 64 queries x 32 keys)
        out, lse, probs = fwd(q, kv, indices, sm_scale, d_v, return_probs)
        return (out, lse, probs) if return_probs else (out, lse)
    return SparseMLARecompute.apply(fwd, bwd, q, kv, indices, sm_scale, d_v, return_probs)
