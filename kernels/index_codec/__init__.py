import numpy as np
import torch

from .. import dispatch
from .reference import BIG, DELTA, GAPS, PREFIX, RepeatedKey, pack_modes, varint_decode, varint_encode

__all__ = ["encode_rows", "decode_rows", "BIG", "DELTA", "GAPS", "PREFIX", "RepeatedKey", "pack_modes",
           "varint_decode", "varint_encode"]
_ON_CPU = torch.empty(0, dtype=torch.int32)  # what dispatch chooses by for decode: records decode on the CPU


def encode_rows(idx: torch.Tensor, delta: bool = True, compress: bool = True,
                chain: int = 64) -> tuple[np.ndarray, bytes, bytes]:
    """A completion's selections idx [T, L, K] int (key positions or -1, checked by the caller) -> each
    row's mode (uint8 [L*T], layer-major), the counts and the payload as varints: reference.py defines
    them; RepeatedKey (a ValueError) when a row holds a key twice. Backends: reference (numpy), cpu."""
    if idx.dim() != 3:
        raise ValueError(f"indices: expected [T, L, K], got {tuple(idx.shape)}")
    return dispatch.choose("index_encode", idx)(idx, delta, compress, chain)


def decode_rows(modes: bytes, counts: bytes, payload: bytes, T: int, L: int, K: int, chain: int = 64) -> torch.Tensor:
    """A record's 2-bit row modes, counts and payload varints -> int32 [T, L, K], each row its keys
    ascending, then -1 padding. Backends: reference (numpy), cpu."""
    return dispatch.choose("index_decode", _ON_CPU)(modes, counts, payload, T, L, K, chain)
