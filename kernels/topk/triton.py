"""Top-k selection for CUDA tensors: torch.topk per chunk of query rows.

This is the baseline the DSA design names (DeepGEMM's indexer logits + torch.topk in SGLang's bench,
DSA.md section 5): chunking over queries bounds the temporaries (topk values, int64 indices) at
chunk * k instead of T * k, and converts to int32 with the -1 padding in the same pass. A Triton
radix select (TileLang `topk_selector.py`: 8-bit histograms over order-preserving integer keys, then
refinement rounds) is the next step; `bench/kernels.py` times this entry point against plain
torch.topk so a replacement can be measured against it.
"""
import torch

from .reference import topk_indices_reference


def topk_indices_chunked(scores: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """scores [B, T, S] -> int32 [B, T, k], best first, -1 where the score is -inf or k > S."""
    B, T, S = scores.shape
    kk = min(k, S)
    out = torch.full((B, T, k), -1, device=scores.device, dtype=torch.int32)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        out[:, t0:t1] = topk_indices_reference(scores[:, t0:t1], k)  # same recency tie-break as the reference
    return out


def topk_indices_triton(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Same contract as `dsarl.kernels.topk_indices` (see reference.py)."""
    if scores.dim() != 3:
        raise ValueError(f"scores: expected [B, T, S], got {tuple(scores.shape)}")
    if k < 1:
        raise ValueError(f"k={k}: expected k >= 1")
    return topk_indices_chunked(scores, k)
