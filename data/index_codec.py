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
varint bytes, or as log2 per number when deflated: deflate undoes much of the varints' byte rounding):
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

VERSION = 1
CHAIN = 64  # longest run of DELTA rows + 1: bounds the decoder's sequential steps
PREFIX, GAPS, DELTA = 0, 1, 2
_BIG = np.int64(1) << 40  # sorts after every key position: stands for -1 while rows are sorted
_ROW = np.int64(1) << 32  # row id * _ROW + value: one sorted int64 key per (row, value)


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


# ---- varints ----------------------------------------------------------------------------------------

def varint_lengths(v: np.ndarray) -> np.ndarray:
    """Bytes of each non-negative int64 as an LEB128 varint."""
    n = np.ones(v.shape, dtype=np.int64)
    for shift in range(7, 63, 7):
        n += v >= (np.int64(1) << shift)
    return n


_LOG2 = np.log2(np.arange(4096) + 2.0)


def _bits(v: np.ndarray) -> np.ndarray:
    """About what deflate makes of a number's varint: log2(v + 2), its significant bits plus one (a
    table for the common small numbers: the logarithm of every gap was a tenth of the encoder's time)."""
    c = _LOG2[np.minimum(v, _LOG2.size - 1)]
    big = v >= _LOG2.size
    if big.any():
        c[big] = np.log2(v[big] + 2.0)
    return c


def varint_encode(v: np.ndarray) -> bytes:
    v = np.asarray(v, dtype=np.int64)
    if v.size and v.min() < 0:
        raise ValueError(f"varint_encode needs non-negative integers, got {v.min()}")
    if not v.size or v.max() < 0x80:  # one byte each (short completions' counts): skip the per-byte passes
        return v.astype(np.uint8).tobytes()
    n = varint_lengths(v)
    starts = np.cumsum(n) - n
    out = np.empty(int(n.sum()), dtype=np.uint8)
    for j in range(int(n.max()) if v.size else 0):  # one pass per byte of the longest number
        m = n > j
        low7 = (v[m] >> (7 * j)) & 0x7F
        out[starts[m] + j] = low7 | ((n[m] > j + 1).astype(np.int64) << 7)  # high bit: more bytes follow
    return out.tobytes()


def varint_decode(b: bytes) -> np.ndarray:
    a = np.frombuffer(b, dtype=np.uint8)
    if not a.size:
        return np.zeros(0, dtype=np.int64)
    if a.max() < 0x80:  # every number one byte
        return a.astype(np.int64)
    ends = np.flatnonzero(a < 0x80)
    if not ends.size or ends[-1] != a.size - 1:
        raise ValueError("varint stream ends inside a number")
    starts = np.concatenate([[0], ends[:-1] + 1])
    shift = 7 * (np.arange(a.size) - np.repeat(starts, ends - starts + 1))
    return np.add.reduceat((a & 0x7F).astype(np.int64) << shift, starts)  # the 7-bit groups do not overlap


# ---- row helpers ------------------------------------------------------------------------------------

def _gaps(values: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Sorted runs (one per row; `first` marks each run's start) -> first value, then gap - 1."""
    g = np.empty_like(values)
    g[0:1] = values[0:1]
    g[1:] = values[1:] - values[:-1] - 1
    g[first] = values[first]
    return g


def _ungap(g: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The inverse of _gaps for runs of the given lengths."""
    d = g + 1
    starts = np.cumsum(lens) - lens
    starts = starts[lens > 0]
    d[starts] -= 1
    cs = np.cumsum(d)
    base = np.zeros(len(starts), dtype=np.int64)
    base[1:] = cs[starts[1:] - 1]
    return cs - np.repeat(base, lens[lens > 0])


def _positions_in_segment(lens: np.ndarray) -> np.ndarray:
    starts = np.cumsum(lens) - lens
    return np.arange(int(lens.sum())) - np.repeat(starts, lens)


def canonical_rows(idx: torch.Tensor) -> torch.Tensor:
    """[..., K] int selections -> int32, each row ascending with its -1 padding last (the decoded form)."""
    x = idx.to(torch.int64)
    s = torch.where(x < 0, torch.full_like(x, int(_BIG)), x).sort(dim=-1).values
    return torch.where(s == int(_BIG), torch.full_like(s, -1), s).to(torch.int32)


def _sorted_rows(idx) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """[T, L, K] -> (rows [L*T, K] int64 ascending, _BIG where -1; n valid per row), checked."""
    x = idx.detach().cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
    if x.ndim != 3:
        raise ValueError(f"indices must be [T, L, K], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"indices must be integers, got {x.dtype}")
    T, L, K = x.shape
    rows = x.transpose(1, 0, 2).reshape(L * T, K).astype(np.int64)
    if rows.size and (rows.min() < -1 or rows.max() >= np.iinfo(np.int32).max):
        raise ValueError(f"indices must be key positions >= 0 or -1 (padding), got values in "
                         f"[{rows.min()}, {rows.max()}]")
    s = np.sort(np.where(rows < 0, _BIG, rows), axis=1)
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] != _BIG)
    if dup.any():
        r = int(np.flatnonzero(dup.any(axis=1))[0])
        raise ValueError(f"indices row (token {r % T}, layer {r // T}) selects a key twice: the codec "
                         f"stores sets")
    return s, (s != _BIG).sum(axis=1), (T, L, K)


# ---- encode -----------------------------------------------------------------------------------------

def _delta_parts(s: np.ndarray, n: np.ndarray, T: int):
    """Per row against the previous row of its layer: (removed ranks, their row ids, added values,
    their row ids, allowed mask). Rows t % CHAIN == 0 (t = 0 included) take no delta (allowed False)."""
    R, K = s.shape
    valid = np.arange(K)[None] < n[:, None]  # [R, K]
    allowed = (np.arange(R) % T) % CHAIN != 0
    prev = np.full_like(s, _BIG)
    prev[1:] = s[:-1]
    prev_valid = np.zeros_like(valid)
    prev_valid[1:] = valid[:-1]
    prev_valid &= allowed[:, None]
    cur_in_prev, prev_in_cur = _row_membership(s, prev)
    rem_rid, rem_rank = np.nonzero(prev_valid & ~prev_in_cur)  # row-major: rows, then ranks, ascending
    add_rid, add_col = np.nonzero(valid & allowed[:, None] & ~cur_in_prev)
    return rem_rank.astype(np.int64), rem_rid, s[add_rid, add_col], add_rid, allowed


def _row_membership(a: np.ndarray, b: np.ndarray, table_size: int = 1 << 23) -> tuple[np.ndarray, np.ndarray]:
    """a, b [R, K] rows of keys (_BIG = none) -> (a[r, i] in b[r], b[r, i] in a[r]) [R, K] bool, for the
    keys that are not _BIG. A lookup table of (row, key) per block of rows: two scatters and two
    gathers, linear in R * K (a binary search per key was the encoder's largest cost)."""
    width = int(max(np.max(np.where(a == _BIG, -1, a), initial=-1), np.max(np.where(b == _BIG, -1, b), initial=-1))) + 2
    a = np.where(a == _BIG, width - 1, a)  # the last column is a sink for padding
    b = np.where(b == _BIG, width - 1, b)
    a_in_b, b_in_a = np.empty(a.shape, dtype=bool), np.empty(b.shape, dtype=bool)
    rows = max(1, min(a.shape[0], table_size // width))  # a short record's table is only as big as its rows
    table = np.zeros(rows * width, dtype=bool)
    for r0 in range(0, a.shape[0], rows):  # blocks of rows whose (row, key) table fits in cache-sized memory
        base = (np.arange(min(rows, a.shape[0] - r0)) * width)[:, None]
        ka, kb = base + a[r0: r0 + rows], base + b[r0: r0 + rows]
        table[kb] = True
        a_in_b[r0: r0 + rows] = table[ka]
        table[kb] = False
        table[ka] = True
        b_in_a[r0: r0 + rows] = table[kb]
        table[ka] = False
    return a_in_b, b_in_a


def _run_starts(row_ids: np.ndarray) -> np.ndarray:
    first = np.ones(row_ids.shape, dtype=bool)
    first[1:] = row_ids[1:] != row_ids[:-1]
    return first


def encode_indices(idx, delta: bool = True, compress: bool = True, level: int = 1) -> PackedIndices:
    """idx [T, L, K] integer (torch or numpy), key positions >= 0 or -1 for padding, no repeated key in a
    row -> PackedIndices. `delta=False` / `compress=False` leave out DELTA rows / deflate (the bench
    measures each candidate; deflate is kept only where it shrinks); decoding reads either."""
    s, n, (T, L, K) = _sorted_rows(idx)
    R = L * T
    valid = np.arange(K)[None] < n[:, None]  # [R, K]
    is_prefix = ((s == np.arange(K)[None]) | ~valid).all(axis=1)
    if is_prefix.all():  # every visible key selected (prompt + completion <= K): the counts are the record
        return _record((T, L, K), np.full(R, PREFIX), n, np.empty(0, dtype=np.int64), compress, level)
    vrid = np.repeat(np.arange(R), n)
    g = np.empty_like(s)  # [R, K] first key, then gap - 1; garbage past n
    g[:, :1] = s[:, :1]
    g[:, 1:] = s[:, 1:] - s[:, :-1] - 1
    gap_vals = g.ravel() if n.min(initial=K) == K else g[valid]
    cost = _bits if compress else varint_lengths
    gaps_cost = np.where(valid, cost(np.minimum(g, _BIG)), 0).sum(axis=1) + cost(n)
    mode = np.where(is_prefix, PREFIX, GAPS)
    if delta:
        rem, rem_rid, add, add_rid, allowed = _delta_parts(s, n, T)
        rem_g, add_g = _gaps(rem, _run_starts(rem_rid)), _gaps(add, _run_starts(add_rid))
        n_rem, n_add = np.bincount(rem_rid, minlength=R), np.bincount(add_rid, minlength=R)
        delta_cost = (np.bincount(rem_rid, weights=cost(rem_g), minlength=R)
                      + np.bincount(add_rid, weights=cost(add_g), minlength=R) + cost(n_rem) + cost(n_add))
        mode = np.where(~is_prefix & allowed & (delta_cost < gaps_cost), DELTA, mode)
    # counts: one number per PREFIX / GAPS row (n), two per DELTA row (removed, added)
    is_delta = mode == DELTA
    counts = np.empty(R + int(is_delta.sum()), dtype=np.int64)
    cpos = np.cumsum(1 + is_delta) - (1 + is_delta)
    counts[cpos] = n
    if is_delta.any():
        counts[cpos[is_delta]] = n_rem[is_delta]
        counts[cpos[is_delta] + 1] = n_add[is_delta]
    # payload: GAPS rows' gaps, DELTA rows' removed then added gaps, in row order
    plen = np.where(mode == GAPS, n, 0)
    if is_delta.any():
        plen = np.where(is_delta, n_rem + n_add, plen)
    pstart = np.cumsum(plen) - plen
    payload = np.empty(int(plen.sum()), dtype=np.int64)
    g_take = mode[vrid] == GAPS
    payload[pstart[vrid[g_take]] + _positions_in_segment(n)[g_take]] = gap_vals[g_take]
    if is_delta.any():
        r_take, a_take = is_delta[rem_rid], is_delta[add_rid]
        payload[pstart[rem_rid[r_take]] + _positions_in_segment(n_rem[is_delta])] = rem_g[r_take]
        payload[pstart[add_rid[a_take]] + n_rem[add_rid[a_take]] + _positions_in_segment(n_add[is_delta])] \
            = add_g[a_take]
    return _record((T, L, K), mode, counts, payload, compress, level)


def prefix_indices(first_n: int, T: int, L: int, K: int, compress: bool = True, level: int = 1) -> PackedIndices:
    """The record of a completion whose every query selected all the keys it saw (prompt + completion <=
    K): token t's rows are 0..first_n + t - 1 in each of L layers. Equal, byte for byte, to encode_indices
    of those rows, written from the counts alone (an engine that ran such a completion dense never built them)."""
    if first_n < 1 or first_n + T - 1 > K:
        raise ValueError(f"prefix rows of {first_n}..{first_n + T - 1} keys do not fit K = {K}")
    n = np.tile(first_n + np.arange(T, dtype=np.int64), L)  # layer-major rows
    return _record((T, L, K), np.full(L * T, PREFIX), n, np.empty(0, dtype=np.int64), compress, level)


def _record(shape: tuple[int, int, int], mode: np.ndarray, counts: np.ndarray, payload: np.ndarray,
            compress: bool, level: int) -> PackedIndices:
    """The rows' modes, counts and payload -> the bytes (header, 2-bit modes, varints; deflated if smaller)."""
    T, L, K = shape
    R = mode.size
    modes = np.zeros((R + 3) // 4 * 4, dtype=np.uint8)
    modes[:R] = mode
    packed_modes = (modes.reshape(-1, 4) << np.array([0, 2, 4, 6], dtype=np.uint8)).sum(axis=1).astype(np.uint8)
    counts_b = varint_encode(counts)
    body = b"".join([varint_encode(np.array([VERSION, T, L, K, CHAIN, packed_modes.size, len(counts_b)])),
                     packed_modes.tobytes(), counts_b, varint_encode(payload)])
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
    R = L * T
    m = np.frombuffer(body, dtype=np.uint8, count=n_modes, offset=off)
    mode = ((m[:, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3).reshape(-1)[:R].astype(np.int64)
    counts = varint_decode(body[off + n_modes: off + n_modes + n_counts])
    payload = varint_decode(body[off + n_modes + n_counts:])
    is_delta = mode == DELTA
    cpos = np.cumsum(1 + is_delta) - (1 + is_delta)
    n = counts[cpos]  # PREFIX / GAPS: n; DELTA: removed (fixed below)
    n_rem = np.where(is_delta, n, 0)
    n_add = np.where(is_delta, counts[np.minimum(cpos + 1, counts.size - 1)], 0)
    plen = np.where(mode == GAPS, n, n_rem + n_add)
    pstart = np.cumsum(plen) - plen
    out = np.full((R, K), _BIG, dtype=np.int64)
    col = np.arange(K)[None]
    pre = mode == PREFIX
    out[pre] = np.where(col < n[pre, None], col, _BIG)
    gaps = mode == GAPS
    if gaps.any():
        lens = n[gaps]
        take = np.repeat(pstart[gaps], lens) + _positions_in_segment(lens)
        out[np.repeat(np.flatnonzero(gaps), lens), _positions_in_segment(lens)] = _ungap(payload[take], lens)
    if is_delta.any():
        _decode_delta_rows(out, mode, n_rem, n_add, pstart, payload, chain)
    out[out == _BIG] = -1
    return torch.from_numpy(out.reshape(L, T, K).transpose(1, 0, 2).astype(np.int32))


def _decode_delta_rows(out, mode, n_rem, n_add, pstart, payload, chain) -> None:
    """Fills the DELTA rows of `out` [R, K] (sorted rows, _BIG padded) in place, depth by depth: a row
    at depth d follows d - 1 DELTA rows after its chain's PREFIX / GAPS head."""
    R = out.shape[0]
    r_ids = np.arange(R)
    head = np.maximum.accumulate(np.where(mode != DELTA, r_ids, 0))
    depth = r_ids - head
    if depth.max() >= chain:
        raise ValueError(f"encoded selection has a DELTA chain of {depth.max()} rows; at most {chain - 1}")
    rows_d = np.flatnonzero(mode == DELTA)
    rem_take = np.repeat(pstart[rows_d], n_rem[rows_d]) + _positions_in_segment(n_rem[rows_d])
    ranks = _ungap(payload[rem_take], n_rem[rows_d])
    add_take = np.repeat(pstart[rows_d] + n_rem[rows_d], n_add[rows_d]) + _positions_in_segment(n_add[rows_d])
    added = _ungap(payload[add_take], n_add[rows_d])
    rank_row = np.repeat(rows_d, n_rem[rows_d])
    add_row = np.repeat(rows_d, n_add[rows_d])
    rank_order = np.argsort(depth[rank_row], kind="stable")
    add_order = np.argsort(depth[add_row], kind="stable")
    rank_bounds = np.searchsorted(depth[rank_row][rank_order], np.arange(chain + 1))
    add_bounds = np.searchsorted(depth[add_row][add_order], np.arange(chain + 1))
    for d in range(1, int(depth.max()) + 1):
        rows = rows_d[depth[rows_d] == d]
        prev = out[rows - 1]  # the previous rows, decoded: [m, K]
        sel = rank_order[rank_bounds[d]: rank_bounds[d + 1]]
        keep = prev != _BIG
        keep[np.searchsorted(rows, rank_row[sel]), ranks[sel]] = False
        kept_row, _ = np.nonzero(keep)
        kept = kept_row * _ROW + prev[keep]  # ascending: rows in order, values ascending inside
        sel = add_order[add_bounds[d]: add_bounds[d + 1]]
        add_local = np.searchsorted(rows, add_row[sel])
        add = add_local * _ROW + added[sel]
        # merge two sorted runs: each element's place is its own index plus the other run's elements before it
        n_row = np.bincount(kept_row, minlength=len(rows)) + np.bincount(add_local, minlength=len(rows))
        row_start = np.cumsum(n_row) - n_row
        new = np.full_like(prev, _BIG)
        pos = np.arange(kept.size) + np.searchsorted(add, kept)
        new[kept_row, pos - row_start[kept_row]] = kept - kept_row * _ROW
        pos = np.arange(add.size) + np.searchsorted(kept, add)
        new[add_local, pos - row_start[add_local]] = added[sel]
        out[rows] = new


def replay_rows(indices: "PackedIndices | torch.Tensor") -> torch.Tensor:
    """A completion's selection as the learner replays it: int32 [T, L, K], rows canonical, from the
    encoded form or from a raw tensor (whose order within rows is then dropped the same way)."""
    if isinstance(indices, PackedIndices):
        return decode_indices(indices)
    return canonical_rows(indices)
