"""Exact, compact encoding of the indexer selections a rollout replays (DESIGN.md section 4, "Replay").

    packed = encode_indices(idx)          # idx [T, L, K] int (-1 padded) -> PackedIndices
    idx2 = decode_indices(packed)         # int32 [T, L, K], rows canonical
    assert torch.equal(idx2, canonical_rows(idx))

A completion's record holds, per generated token t and layer l, the K key positions the sampler's
indexer selected, -1 padded where fewer than K keys were visible. The learner attends to the *set*:
the codec keeps each row's set and its padding exactly, not the engine's order within the row (best
first, a by-product of top-k). Decoded rows are canonical: ascending, then the -1 padding.
`learner/grpo_batch.py` puts raw rows into the same order, so the learner computes the same bits from
either form (sparse attention sums over a row's keys in row order, so order does reach the bits).

Rows are coded layer-major (row r = l * T + t), each in the cheapest of three modes (estimated as
varint bytes, or as log2 per number when deflated: deflate undoes much of the varints' byte rounding;
kernels/index_codec codes the rows, in numpy or C, to the same bytes):
  PREFIX  the row is exactly 0..n-1 (query positions < K see only n <= K keys and select them all):
          only n is stored
  GAPS    n, then the sorted row as its first value and the gaps - 1 between neighbours
  DELTA   the previous token's row of the same layer, minus `removed` (their ranks in that sorted row,
          gap-coded), plus `added` (values, gap-coded): consecutive decode steps change few keys
Every integer is an LEB128 varint (7 bits a byte); the streams are then deflated (zlib), whose Huffman
stage takes the varint bytes close to their entropy. Rows with t % CHAIN == 0 never use DELTA, so the
decoder walks at most CHAIN - 1 steps, each vectorised over every chain at that depth: the Python
loops run over a chain's depth and a varint's byte, never over rows.

Layout: a flag byte (0 plain, 1 deflated) then the body: varints [VERSION, T, L, K, CHAIN, modes bytes,
counts bytes], the row modes (2 bits a row), the counts stream (PREFIX/GAPS: n; DELTA: removed,
added), the payload stream (GAPS: n numbers; DELTA: removed then added numbers).
"""
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from dsarl.kernels.index_codec import (BIG as _BIG, PREFIX, decode_rows, encode_rows, pack_modes, varint_decode,
                                       varint_encode)

VERSION = 1
CHAIN = 64  # longest run of DELTA rows + 1: bounds the decoder's sequential steps


@dataclass(frozen=True)
class PackedIndices:
    """One completion's selections [T, L, K], encoded by `encode_indices`."""

    shape: tuple[int, int, int]  # (T, L, K)
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def decode(self) -> torch.Tensor:
        return decode_indices(self)


# ---- row helpers ------------------------------------------------------------------------------------

def canonical_rows(idx: torch.Tensor) -> torch.Tensor:
    """[..., K] int selections -> int32, each row ascending with its -1 padding last (the decoded form)."""
    x = idx.to(torch.int64)
    s = torch.where(x < 0, torch.full_like(x, int(_BIG)), x).sort(dim=-1).values
    return torch.where(s == int(_BIG), torch.full_like(s, -1), s).to(torch.int32)


def _checked(idx) -> torch.Tensor:
    """[T, L, K] integer key positions or -1 (torch or numpy) -> an int32 CPU tensor; a ValueError naming
    the problem otherwise (a key twice in a row is the row coder's to find: it sorts the rows)."""
    x = torch.from_numpy(np.ascontiguousarray(idx)) if not isinstance(idx, torch.Tensor) else idx.detach().cpu()
    if x.dim() != 3:
        raise ValueError(f"indices must be [T, L, K], got shape {tuple(x.shape)}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"indices must be integers, got {x.dtype}")
    if x.dtype in (torch.uint16, torch.uint32, torch.uint64):  # few torch ops take these: widen first
        x = x.to(torch.int64)
    lo, hi = (int(v) for v in torch.aminmax(x)) if x.numel() else (0, 0)  # one pass over the record
    if lo < -1 or hi >= np.iinfo(np.int32).max:
        raise ValueError(f"indices must be key positions >= 0 or -1 (padding), got values in [{lo}, {hi}]")
    return x.to(torch.int32)


# ---- encode -----------------------------------------------------------------------------------------

def encode_indices(idx, delta: bool = True, compress: bool = True, level: int = 1) -> PackedIndices:
    """idx [T, L, K] integer (torch or numpy), key positions >= 0 or -1 for padding, no repeated key in a
    row -> PackedIndices. `delta=False` / `compress=False` leave out DELTA rows / deflate (the bench
    measures each candidate; deflate is kept only where it shrinks); decoding reads either. The rows'
    modes, counts and payload come from the `index_encode` kernel op (kernels/index_codec: numpy, or C)."""
    x = _checked(idx)
    mode, counts, payload = encode_rows(x, delta=delta, compress=compress, chain=CHAIN)
    return _record(tuple(x.shape), mode, counts, payload, compress, level)


def prefix_indices(first_n: int, T: int, L: int, K: int, compress: bool = True, level: int = 1) -> PackedIndices:
    """The record of a completion whose every query selected all the keys it saw (prompt + completion <=
    K): token t's rows are 0..first_n + t - 1 in each of L layers. Equal, byte for byte, to encode_indices
    of those rows, written from the counts alone (an engine that ran such a completion dense never built them)."""
    if first_n < 1 or first_n + T - 1 > K:
        raise ValueError(f"prefix rows of {first_n}..{first_n + T - 1} keys do not fit K = {K}")
    n = np.tile(first_n + np.arange(T, dtype=np.int64), L)  # layer-major rows
    return _record((T, L, K), np.full(L * T, PREFIX, dtype=np.uint8), varint_encode(n), b"", compress, level)


def _record(shape: tuple[int, int, int], mode: np.ndarray, counts: bytes, payload: bytes, compress: bool,
            level: int) -> PackedIndices:
    """The rows' modes and their counts and payload varints -> the bytes (header, 2-bit modes, the two
    streams; deflated if smaller)."""
    T, L, K = shape
    modes = pack_modes(mode)
    body = b"".join([varint_encode(np.array([VERSION, T, L, K, CHAIN, len(modes), len(counts)])), modes, counts,
                     payload])
    data = b"\x00" + body
    if compress:
        deflated = b"\x01" + zlib.compress(body, level)
        data = deflated if len(deflated) < len(data) else data  # tiny records do not shrink
    return PackedIndices((T, L, K), data)


# ---- decode -----------------------------------------------------------------------------------------

def _read_header(body: bytes) -> tuple[list[int], int]:
    """The seven header varints and the offset after them."""
    a = np.frombuffer(body[:70], dtype=np.uint8)
    end = int(np.flatnonzero(a < 0x80)[6]) + 1
    return varint_decode(body[:end]).tolist(), end


def decode_indices(packed: PackedIndices) -> torch.Tensor:
    """PackedIndices -> int32 [T, L, K]: each row its selected keys ascending, then -1 padding."""
    flag, body = packed.data[:1], packed.data[1:]
    if flag not in (b"\x00", b"\x01"):
        raise ValueError(f"not an encoded selection (flag byte {flag!r})")
    body = zlib.decompress(body) if flag == b"\x01" else body
    (version, T, L, K, chain, n_modes, n_counts), off = _read_header(body)
    if version != VERSION or (T, L, K) != tuple(packed.shape):
        raise ValueError(f"encoded selection: version {version}, shape {(T, L, K)}; expected version "
                         f"{VERSION}, shape {tuple(packed.shape)}")
    modes = body[off: off + n_modes]
    counts = body[off + n_modes: off + n_modes + n_counts]
    return decode_rows(modes, counts, body[off + n_modes + n_counts:], T, L, K, chain)


def replay_rows(indices: "PackedIndices | torch.Tensor") -> torch.Tensor:
    """A completion's selection as the learner replays it: int32 [T, L, K], rows canonical, from the
    encoded form or from a raw tensor (whose order within rows is then dropped the same way)."""
    if isinstance(indices, PackedIndices):
        return decode_indices(indices)
    return canonical_rows(indices)
