"""The replay codec's rows in numpy: the definition of their bytes (data/index_codec.py has the record).

    modes, counts, payload = encode_rows_reference(idx, delta=True, compress=True, chain=64)
    idx2 = decode_rows_reference(pack_modes(modes), counts, payload, T, L, K, chain=64)

idx [T, L, K] int32 key positions, -1 padded, no key twice in a row. Rows go layer-major (r = l * T + t);
each takes the cheapest of PREFIX (the row is 0..n-1), GAPS (its sorted keys as first value, then gap - 1)
and DELTA (the previous row of its layer, minus `removed` ranks, plus `added` keys; never at t % chain == 0).
Cheapest by an integer cost: varint bytes, or with deflate on, 256 * log2(v + 2) rounded (deflate's
Huffman stage takes varints close to their entropy), so that cpu.c's sums and comparisons are exactly these.
Returns the 2-bit modes (one uint8 a row), the counts as varints (PREFIX / GAPS: n; DELTA: removed, added)
and the payload as varints (GAPS: the gaps; DELTA: the removed ranks' gaps, then the added keys' gaps).
"""
import numpy as np
import torch

PREFIX, GAPS, DELTA = 0, 1, 2
BIG = np.int64(1) << 40  # sorts after every key position: stands for -1 while rows are sorted
# 256 * log2(v + 2), rounded, for v < 4096; larger v by their top 12 bits (cost_bits)
BITS_TABLE = np.rint(256 * np.log2(np.arange(4096) + 2.0)).astype(np.int32)


class RepeatedKey(ValueError):
    def __init__(self, row: int, T: int):
        super().__init__(f"indices row (token {row % T}, layer {row // T}) selects a key twice: the codec "
                         f"stores sets")


def varint_lengths(v: np.ndarray) -> np.ndarray:
    """Bytes of each non-negative int64 as an LEB128 varint."""
    n = np.ones(v.shape, dtype=np.int64)
    for shift in range(7, 63, 7):
        n += v >= (np.int64(1) << shift)
    return n


def cost_bits(v: np.ndarray) -> np.ndarray:
    """256 * log2(v + 2), about what deflate makes of a number's varint in 1/256 bits, as an integer: the
    table below 4096; above it, 256 per bit past the top 12 plus the table at those 12 bits."""
    v = np.maximum(v, 0)
    c = BITS_TABLE[np.minimum(v, BITS_TABLE.size - 1)].astype(np.int64)
    big = v >= BITS_TABLE.size
    if big.any():
        x = v[big] + 2
        shift = np.frexp(x.astype(np.float64))[1].astype(np.int64) - 12  # bit length - 12 (exact below 2^53)
        c[big] = 256 * shift + BITS_TABLE[(x >> shift) - 2]
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


def pack_modes(mode: np.ndarray) -> bytes:
    """Row modes (0..2, one a row) -> 2 bits a row, four rows a byte, the first in the low bits."""
    modes = np.zeros((mode.size + 3) // 4 * 4, dtype=np.uint8)
    modes[:mode.size] = mode
    return (modes.reshape(-1, 4) << np.array([0, 2, 4, 6], dtype=np.uint8)).sum(axis=1).astype(np.uint8).tobytes()


def positions_in_segment(lens: np.ndarray) -> np.ndarray:
    starts = np.cumsum(lens) - lens
    return np.arange(int(lens.sum())) - np.repeat(starts, lens)


def _gaps(values: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Sorted runs (one per row; `first` marks each run's start) -> first value, then gap - 1."""
    g = np.empty_like(values)
    g[0:1] = values[0:1]
    g[1:] = values[1:] - values[:-1] - 1
    g[first] = values[first]
    return g


def _run_starts(row_ids: np.ndarray) -> np.ndarray:
    first = np.ones(row_ids.shape, dtype=bool)
    first[1:] = row_ids[1:] != row_ids[:-1]
    return first


def sorted_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[T, L, K] -> (rows [L*T, K] int64 ascending, BIG where -1; n valid per row); RepeatedKey if a row
    holds a key twice."""
    T, L, K = x.shape
    rows = x.transpose(1, 0, 2).reshape(L * T, K).astype(np.int64)
    s = np.sort(np.where(rows < 0, BIG, rows), axis=1)
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] != BIG)
    if dup.any():
        raise RepeatedKey(int(np.flatnonzero(dup.any(axis=1))[0]), T)
    return s, (s != BIG).sum(axis=1)


def _row_membership(a: np.ndarray, b: np.ndarray, table_size: int = 1 << 23) -> tuple[np.ndarray, np.ndarray]:
    """a, b [R, K] rows of keys (BIG = none) -> (a[r, i] in b[r], b[r, i] in a[r]) [R, K] bool, for the
    keys that are not BIG. A lookup table of (row, key) per block of rows: two scatters and two
    gathers, linear in R * K (a binary search per key was the encoder's largest cost)."""
    width = int(max(np.max(np.where(a == BIG, -1, a), initial=-1), np.max(np.where(b == BIG, -1, b), initial=-1))) + 2
    a = np.where(a == BIG, width - 1, a)  # the last column is a sink for padding
    b = np.where(b == BIG, width - 1, b)
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


def _delta_parts(s: np.ndarray, n: np.ndarray, T: int, chain: int):
    """Per row against the previous row of its layer: (removed ranks, their row ids, added values,
    their row ids, allowed mask). Rows t % chain == 0 (t = 0 included) take no delta (allowed False)."""
    R, K = s.shape
    valid = np.arange(K)[None] < n[:, None]  # [R, K]
    allowed = (np.arange(R) % T) % chain != 0
    prev = np.full_like(s, BIG)
    prev[1:] = s[:-1]
    prev_valid = np.zeros_like(valid)
    prev_valid[1:] = valid[:-1]
    prev_valid &= allowed[:, None]
    cur_in_prev, prev_in_cur = _row_membership(s, prev)
    rem_rid, rem_rank = np.nonzero(prev_valid & ~prev_in_cur)  # row-major: rows, then ranks, ascending
    add_rid, add_col = np.nonzero(valid & allowed[:, None] & ~cur_in_prev)
    return rem_rank.astype(np.int64), rem_rid, s[add_rid, add_col], add_rid, allowed


def encode_rows_reference(idx: torch.Tensor, delta: bool = True, compress: bool = True,
                          chain: int = 64) -> tuple[np.ndarray, bytes, bytes]:
    """idx [T, L, K] int (checked by the caller: key positions or -1) -> (modes uint8 [L*T], counts
    varints, payload varints); RepeatedKey when a row holds a key twice."""
    x = idx.detach().cpu().numpy()
    T, L, K = x.shape
    s, n = sorted_rows(x)
    R = L * T
    valid = np.arange(K)[None] < n[:, None]  # [R, K]
    is_prefix = ((s == np.arange(K)[None]) | ~valid).all(axis=1)
    if is_prefix.all():  # every visible key selected (prompt + completion <= K): the counts are the record
        return np.full(R, PREFIX, dtype=np.uint8), varint_encode(n), b""
    vrid = np.repeat(np.arange(R), n)
    g = np.empty_like(s)  # [R, K] first key, then gap - 1; garbage past n
    g[:, :1] = s[:, :1]
    g[:, 1:] = s[:, 1:] - s[:, :-1] - 1
    gap_vals = g.ravel() if n.min(initial=K) == K else g[valid]
    cost = cost_bits if compress else varint_lengths
    gaps_cost = np.where(valid, cost(np.minimum(g, BIG)), 0).sum(axis=1) + cost(n)
    mode = np.where(is_prefix, PREFIX, GAPS)
    if delta:
        rem, rem_rid, add, add_rid, allowed = _delta_parts(s, n, T, chain)
        rem_g, add_g = _gaps(rem, _run_starts(rem_rid)), _gaps(add, _run_starts(add_rid))
        n_rem, n_add = np.bincount(rem_rid, minlength=R), np.bincount(add_rid, minlength=R)
        sums = lambda rid, v: np.bincount(rid, weights=v, minlength=R).astype(np.int64)  # noqa: E731 (exact)
        delta_cost = sums(rem_rid, cost(rem_g)) + sums(add_rid, cost(add_g)) + cost(n_rem) + cost(n_add)
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
    payload[pstart[vrid[g_take]] + positions_in_segment(n)[g_take]] = gap_vals[g_take]
    if is_delta.any():
        r_take, a_take = is_delta[rem_rid], is_delta[add_rid]
        payload[pstart[rem_rid[r_take]] + positions_in_segment(n_rem[is_delta])] = rem_g[r_take]
        payload[pstart[add_rid[a_take]] + n_rem[add_rid[a_take]] + positions_in_segment(n_add[is_delta])] \
            = add_g[a_take]
    return mode.astype(np.uint8), varint_encode(counts), varint_encode(payload)

# ---- decode -----------------------------------------------------------------------------------------

ROW = np.int64(1) << 32  # row id * ROW + value: one sorted int64 key per (row, value)


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


def _ungap(g: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Runs of first value, then gap - 1 (the encoder's gap code), of the given lengths -> the values."""
    d = g + 1
    starts = np.cumsum(lens) - lens
    starts = starts[lens > 0]
    d[starts] -= 1
    cs = np.cumsum(d)
    base = np.zeros(len(starts), dtype=np.int64)
    base[1:] = cs[starts[1:] - 1]
    return cs - np.repeat(base, lens[lens > 0])


def decode_rows_reference(modes: bytes, counts: bytes, payload: bytes, T: int, L: int, K: int,
                          chain: int = 64) -> torch.Tensor:
    """The 2-bit row modes and the counts and payload varints of a record -> int32 [T, L, K], each row its
    keys ascending, then -1 padding. Vectorised over the rows of each mode, and for DELTA rows over every
    chain at the same depth (at most chain - 1 sequential steps)."""
    R = L * T
    m = np.frombuffer(modes, dtype=np.uint8)
    mode = ((m[:, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3).reshape(-1)[:R].astype(np.int64)
    counts = varint_decode(counts)
    payload = varint_decode(payload)
    is_delta = mode == DELTA
    cpos = np.cumsum(1 + is_delta) - (1 + is_delta)
    n = counts[cpos]  # PREFIX / GAPS: n; DELTA: removed (fixed below)
    n_rem = np.where(is_delta, n, 0)
    n_add = np.where(is_delta, counts[np.minimum(cpos + 1, counts.size - 1)], 0)
    plen = np.where(mode == GAPS, n, n_rem + n_add)
    pstart = np.cumsum(plen) - plen
    out = np.full((R, K), BIG, dtype=np.int64)
    col = np.arange(K)[None]
    pre = mode == PREFIX
    out[pre] = np.where(col < n[pre, None], col, BIG)
    gaps = mode == GAPS
    if gaps.any():
        lens = n[gaps]
        take = np.repeat(pstart[gaps], lens) + positions_in_segment(lens)
        out[np.repeat(np.flatnonzero(gaps), lens), positions_in_segment(lens)] = _ungap(payload[take], lens)
    if is_delta.any():
        _decode_delta_rows(out, mode, n_rem, n_add, pstart, payload, chain)
    out[out == BIG] = -1
    return torch.from_numpy(out.reshape(L, T, K).transpose(1, 0, 2).astype(np.int32))


def _decode_delta_rows(out, mode, n_rem, n_add, pstart, payload, chain) -> None:
    """Fills the DELTA rows of `out` [R, K] (sorted rows, BIG padded) in place, depth by depth: a row
    at depth d follows d - 1 DELTA rows after its chain's PREFIX / GAPS head."""
    R = out.shape[0]
    r_ids = np.arange(R)
    head = np.maximum.accumulate(np.where(mode != DELTA, r_ids, 0))
    depth = r_ids - head
    if depth.max() >= chain:
        raise ValueError(f"encoded selection has a DELTA chain of {depth.max()} rows; at most {chain - 1}")
    rows_d = np.flatnonzero(mode == DELTA)
    rem_take = np.repeat(pstart[rows_d], n_rem[rows_d]) + positions_in_segment(n_rem[rows_d])
    ranks = _ungap(payload[rem_take], n_rem[rows_d])
    add_take = np.repeat(pstart[rows_d] + n_rem[rows_d], n_add[rows_d]) + positions_in_segment(n_add[rows_d])
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
        keep = prev != BIG
        keep[np.searchsorted(rows, rank_row[sel]), ranks[sel]] = False
        kept_row, _ = np.nonzero(keep)
        kept = kept_row * ROW + prev[keep]  # ascending: rows in order, values ascending inside
        sel = add_order[add_bounds[d]: add_bounds[d + 1]]
        add_local = np.searchsorted(rows, add_row[sel])
        add = add_local * ROW + added[sel]
        # merge two sorted runs: each element's place is its own index plus the other run's elements before it
        n_row = np.bincount(kept_row, minlength=len(rows)) + np.bincount(add_local, minlength=len(rows))
        row_start = np.cumsum(n_row) - n_row
        new = np.full_like(prev, BIG)
        pos = np.arange(kept.size) + np.searchsorted(add, kept)
        new[kept_row, pos - row_start[kept_row]] = kept - kept_row * ROW
        pos = np.arange(add.size) + np.searchsorted(kept, add)
        new[add_local, pos - row_start[add_local]] = added[sel]
        out[rows] = new
