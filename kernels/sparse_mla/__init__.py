import torch

from ..dispatch import forced_backend, use_triton
from . import cpu
from .chunked import sparse_mla_attention_chunked
from .reference import gather_rows, sparse_mla_attention_reference


def sparse_mla_attention(q, kv, indices, sm_scale: float, d_v: int, return_probs: bool = False):
    """Attention of each query over its selected latent KV rows (MQA form, all heads share a row).

    q [B, T, H, Dqk], kv [B, S, Dqk] = [c_kv ; k_pe], indices [B, T, K] int32 (-1 = none).
    Returns out [B, T, H, d_v] (values are kv[..., :d_v]), lse [B, T, H] fp32 (natural log),
    and with return_probs the head-summed probabilities [B, T, K] fp32 (0 on -1 entries).
    Differentiable in q and kv. Backends: Triton on CUDA; on CPU the C kernel (cpu.c, fp32 maths,
    built on first use) or, without a C compiler, for fp64 or with DSARL_NATIVE=0, the query-chunked
    torch path (chunked.py); both recompute in backward, memory independent of T.
    DSARL_KERNELS=reference forces the plain reference, =triton the kernel.
    """
    if use_triton(q):
        from .triton import sparse_mla_attention_triton

        return sparse_mla_attention_triton(q, kv, indices, sm_scale, d_v, return_probs)
    if forced_backend() == "reference" or q.is_cuda:
        return sparse_mla_attention_reference(q, kv, indices, sm_scale, d_v, return_probs)
    if q.dtype != torch.float64 and cpu.available():
        return cpu.sparse_mla_attention_cpu(q, kv, indices, sm_scale, d_v, return_probs)
    return sparse_mla_attention_chunked(q, kv, indices, sm_scale, d_v, return_probs)


__all__ = ["sparse_mla_attention", "sparse_mla_attention_reference", "sparse_mla_attention_chunked", "gather_rows"]
