"""The replay codec's row coder and decoder through cpu.c: the CPU backend (same bytes and rows as
reference.py).

A completion's record ([16, 4, 256] rows at 1000-token prompts) took 1.5 ms in numpy's passes over
[R, K] arrays, most of it fixed per-pass cost; cpu.c walks each row once. Records of many rows go in
chunks, so its output buffers (sized for the worst case, 2 K varints a row) stay small.
"""
import ctypes

import numpy as np
import torch

from .. import native
from .reference import BITS_TABLE, RepeatedKey

SOURCE = native.source("index_codec/cpu.c")
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
SIGNATURES = {"encode_rows": [_P] + [_I64] * 3 + [_P] + [_I64] * 4 + [_P] * 5, "encode_costs": [_P, _I64, _P, _P],
              "decode_rows": [_P, _I64] * 3 + [_I64] * 4 + [_P]}
CORRUPT = {1: "its row modes end early", 2: "its counts stream ends early or inside a number",
           3: "its payload ends early or inside a number", 4: "a row holds more than K keys",
           5: "a key or rank out of range", 6: "a DELTA row without a previous row, or past the chain bound",
           7: "an unknown row mode", 8: "a DELTA row adds a key its previous row keeps",
           9: "bytes left over after the last row"}
CHUNK_BYTES = 8 << 20  # each chunk's payload buffer at most this big
_BITS = torch.from_numpy(BITS_TABLE)


def _lib():
    return native.require(SOURCE, SIGNATURES)


def costs_cpu(values: np.ndarray, compress: bool = True) -> np.ndarray:
    """cpu.c's cost of each non-negative int64 (reference.cost_bits, or varint_lengths with compress off)."""
    lib = _lib()
    v = np.ascontiguousarray(values, dtype=np.int64)
    out = np.empty_like(v)
    lib.encode_costs(v.ctypes.data, v.size, native.ptr(_BITS) if compress else None, out.ctypes.data)
    return out


def encode_rows_cpu(idx: torch.Tensor, delta: bool = True, compress: bool = True,
                    chain: int = 64) -> tuple[np.ndarray, bytes, bytes]:
    """reference.encode_rows_reference's contract and bytes."""
    lib = _lib()
    x = idx.detach().to("cpu", torch.int32).contiguous()
    T, L, K = x.shape
    R = L * T
    modes = np.empty(R, dtype=np.uint8)
    rows = max(1, min(R, CHUNK_BYTES // (10 * max(K, 1))))
    counts = np.empty(rows * 10, dtype=np.uint8)
    payload = np.empty(rows * 10 * max(K, 1), dtype=np.uint8)
    lens = np.zeros(2, dtype=np.int64)
    counts_parts, payload_parts = [], []
    for r0 in range(0, R, rows):
        r1 = min(R, r0 + rows)
        status = lib.encode_rows(native.ptr(x), T, L, K, native.ptr(_BITS) if compress else None, int(delta), chain,
                                 r0, r1, modes[r0:].ctypes.data, counts.ctypes.data, lens[0:].ctypes.data,
                                 payload.ctypes.data, lens[1:].ctypes.data)
        if status < 0:
            raise MemoryError("index codec: the C row coder could not allocate its buffers")
        if status > 0:
            raise RepeatedKey(status - 1, T)
        counts_parts.append(counts[: lens[0]].tobytes())
        payload_parts.append(payload[: lens[1]].tobytes())
    return modes, b"".join(counts_parts), b"".join(payload_parts)


def decode_rows_cpu(modes: bytes, counts: bytes, payload: bytes, T: int, L: int, K: int,
                    chain: int = 64) -> torch.Tensor:
    """reference.decode_rows_reference's contract and rows; a ValueError naming the fault for a corrupt
    record."""
    out = torch.empty((T, L, K), dtype=torch.int32)
    status = _lib().decode_rows(modes, len(modes), counts, len(counts), payload, len(payload), T, L, K, chain,
                                native.ptr(out))
    if status < 0:
        raise MemoryError("index codec: the C decoder could not allocate its buffer")
    if status > 0:
        raise ValueError(f"encoded selection is corrupt: {CORRUPT[status]}")
    return out
