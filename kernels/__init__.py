"""Attention maths as ops (DESIGN.md section 3), each with a torch reference, and where it pays a
Triton kernel (CUDA) and one fast CPU implementation; dispatch.py holds every op's table and the one
rule that chooses. `DSARL_KERNELS=reference|cpu|triton` forces a backend for every op.

Imports nothing else of dsarl.
"""
from .dense_mla import dense_mha_attention, dense_mla_attention
from .fp8 import fp8_quant_dequant, fp8_quantize
from .indexer_kl import indexer_kl_loss
from .indexer_scores import default_positions, indexer_scores, indexer_scores_selected, visibility
from .rowwise import rms_norm, swiglu
from .sparse_mla import gather_rows, sparse_mla_attention
from .topk import indexer_topk, topk_indices

__all__ = [
    "dense_mha_attention", "dense_mla_attention", "fp8_quant_dequant", "fp8_quantize", "indexer_kl_loss",
    "default_positions", "indexer_scores", "indexer_scores_selected", "visibility", "gather_rows",
    "sparse_mla_attention", "indexer_topk", "topk_indices", "rms_norm", "swiglu",
]
