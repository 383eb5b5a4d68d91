import numpy as np
import torch

from .. import dispatch
from .reference import BIG, DELTA, GAPS, PREFIX, RepeatedKey, positions_in_segment, varint_encode, varint_lengths

__all__ = ["encode_rows", "BIG", "DELTA", "GAPS", "PREFIX", "RepeatedKey", "positions_in_segment", "varint_encode",
           "varint_lengths"]


def encode_rows(idx: torch.Tensor, delta: bool = True, compress: bool = True,
                chain: int = 64) -> tuple[np.ndarray, bytes, bytes]:
    """A completion's selections idx [T, L, K] int (key positions or -1, checked by the caller) -> each
    row's mode (uint8 [L*T], layer-major), the counts and the payload as varints: reference.py defines
    them; RepeatedKey (a ValueError) when a row holds a key twice. Backends: reference (numpy), cpu."""
    if idx.dim() != 3:
        raise ValueError(f"indices: expected [T, L, K], got {tuple(idx.shape)}")
    return dispatch.choose("index_rows", idx)(idx, delta, compress, chain)
