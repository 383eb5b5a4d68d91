// The replay codec's row coder and decoder in C: what reference.py's numpy passes compute, a row at a time.
//
// For each row r = l * T + t (layer-major) of a completion's selections idx [T, L, K] (int32, -1 padded):
// sort its keys, pick the cheapest mode (PREFIX / GAPS / DELTA against the previous row of its layer, the
// same integer cost and the same strict comparison as the reference, so the same mode), and append its
// counts and payload as LEB128 varints. The bytes equal the reference's; data/index_codec.py adds the
// header and deflate. Sorting: the keys as bits of a bitmap over the row's span, read back in order (a
// row's K keys usually lie within a few K positions: the prompt and the tokens so far), or qsort where
// the span is too wide for the bitmap.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { PREFIX = 0, GAPS = 1, DELTA = 2 };

// Bytes of v as a varint (compress off), or 256 * log2(v + 2) rounded, from the table of v < 4096 and,
// above it, the top 12 bits of v + 2 plus its exponent (compress on): reference.py's cost_bits.
static inline int64_t cost(uint64_t v, const int32_t *bits) {
    if (bits == NULL) {
        int64_t n = 1;
        while (v >= 128) { v >>= 7; n++; }
        return n;
    }
    if (v < 4096) return bits[v];
    uint64_t x = v + 2;
    int shift = 64 - __builtin_clzll(x) - 12;
    return 256 * (int64_t)shift + bits[(x >> shift) - 2];
}

// costs[i] = cost(values[i]) (tests: the same integers as reference.cost_bits / varint_lengths)
void encode_costs(const int64_t *values, int64_t n, const int32_t *bits, int64_t *costs) {
    for (int64_t i = 0; i < n; i++) costs[i] = cost((uint64_t)values[i], bits);
}

static inline uint8_t *put_varint(uint8_t *p, uint64_t v) {
    while (v >= 128) { *p++ = (uint8_t)(v | 128); v >>= 7; }
    *p++ = (uint8_t)v;
    return p;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

// The row's keys >= 0 into out, ascending -> how many, or -1 when a key repeats. bitmap: span_words
// words of zeros, left zeroed.
static int64_t sort_row(const int32_t *row, int64_t K, uint64_t *bitmap, int64_t span_words, int64_t *out) {
    int64_t lo = INT64_MAX, hi = -1, n = 0;
    for (int64_t k = 0; k < K; k++) {
        int64_t v = row[k];
        if (v < 0) continue;
        out[n++] = v;
        if (v < lo) lo = v;
        if (v > hi) hi = v;
    }
    if (n == 0) return 0;
    int64_t base = lo & ~(int64_t)63, words = ((hi - base) >> 6) + 1;
    if (words > span_words) {  // keys spread too far for the bitmap
        qsort(out, (size_t)n, sizeof(int64_t), cmp_i64);
        for (int64_t i = 1; i < n; i++)
            if (out[i] == out[i - 1]) return -1;
        return n;
    }
    int repeat = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t d = out[i] - base;
        uint64_t bit = 1ull << (d & 63);
        repeat |= (bitmap[d >> 6] & bit) != 0;
        bitmap[d >> 6] |= bit;
    }
    int64_t m = 0;
    for (int64_t w = 0; w < words; w++) {
        uint64_t b = bitmap[w];
        bitmap[w] = 0;
        while (b) {
            out[m++] = base + (w << 6) + __builtin_ctzll(b);
            b &= b - 1;
        }
    }
    return repeat ? -1 : n;
}

// Gap code of an ascending run: its first value, then each difference - 1.
static int64_t gaps_cost(const int64_t *v, int64_t n, const int32_t *bits) {
    if (n == 0) return 0;
    int64_t c = cost((uint64_t)v[0], bits);
    for (int64_t i = 1; i < n; i++) c += cost((uint64_t)(v[i] - v[i - 1] - 1), bits);
    return c;
}

static uint8_t *put_gaps(uint8_t *p, const int64_t *v, int64_t n) {
    if (n == 0) return p;
    p = put_varint(p, (uint64_t)v[0]);
    for (int64_t i = 1; i < n; i++) p = put_varint(p, (uint64_t)(v[i] - v[i - 1] - 1));
    return p;
}

// Rows [r0, r1) of idx [T, L, K]: modes[r - r0], counts and payload varints appended at counts / payload
// (room for 2 varints a row and 2 K a row; every number here is below 2^32, so 5 bytes each). bits: the
// compress cost table (reference.BITS_TABLE), NULL for varint bytes. delta: 0 leaves DELTA out.
// -> 0; r + 1 when row r selects a key twice; -1 when out of memory. counts_len / payload_len: bytes written.
int encode_rows(const int32_t *idx, int64_t T, int64_t L, int64_t K, const int32_t *bits, int64_t delta,
                int64_t chain, int64_t r0, int64_t r1, uint8_t *modes, uint8_t *counts, int64_t *counts_len,
                uint8_t *payload, int64_t *payload_len) {
    int64_t span_words = 4 * K + 2;
    uint64_t *bitmap = calloc((size_t)span_words, sizeof(uint64_t));
    int64_t *buf = malloc(sizeof(int64_t) * (size_t)(4 * K + 1));
    if (!bitmap || !buf) { free(bitmap); free(buf); return -1; }
    int64_t *cur = buf, *prev = buf + K, *rem = buf + 2 * K, *add = buf + 3 * K;
    int64_t n_prev = -1;  // the sorted previous row is not held yet
    uint8_t *pc = counts, *pp = payload;
    int status = 0;  // a row number + 1 fits: a record's rows (tokens x layers) stay far below 2^31
    for (int64_t r = r0; r < r1; r++) {
        int64_t t = r % T, l = r / T;
        int allowed = delta && t % chain != 0;
        if (allowed && n_prev < 0) {  // the chunk's first row: sort the row before it
            n_prev = sort_row(idx + ((t - 1) * L + l) * K, K, bitmap, span_words, prev);
            if (n_prev < 0) { status = (int)r; break; }
        }
        int64_t n = sort_row(idx + (t * L + l) * K, K, bitmap, span_words, cur);
        if (n < 0) { status = (int)(r + 1); break; }
        if (n == 0 || cur[n - 1] == n - 1) {  // 0..n-1: every visible key
            modes[r - r0] = PREFIX;
            pc = put_varint(pc, (uint64_t)n);
        } else {
            int64_t gcost = cost((uint64_t)n, bits) + gaps_cost(cur, n, bits);
            int64_t n_rem = 0, n_add = 0, dcost = INT64_MAX;
            if (allowed) {  // merge with the previous row: ranks of its keys gone, keys new here
                int64_t i = 0, j = 0;
                while (i < n_prev || j < n) {
                    if (j == n || (i < n_prev && prev[i] < cur[j])) rem[n_rem++] = i++;
                    else if (i == n_prev || cur[j] < prev[i]) add[n_add++] = cur[j++];
                    else { i++; j++; }
                }
                dcost = cost((uint64_t)n_rem, bits) + cost((uint64_t)n_add, bits) + gaps_cost(rem, n_rem, bits)
                        + gaps_cost(add, n_add, bits);
            }
            if (allowed && dcost < gcost) {
                modes[r - r0] = DELTA;
                pc = put_varint(pc, (uint64_t)n_rem);
                pc = put_varint(pc, (uint64_t)n_add);
                pp = put_gaps(pp, rem, n_rem);
                pp = put_gaps(pp, add, n_add);
            } else {
                modes[r - r0] = GAPS;
                pc = put_varint(pc, (uint64_t)n);
                pp = put_gaps(pp, cur, n);
            }
        }
        int64_t *swap = prev; prev = cur; cur = swap;
        n_prev = n;
    }
    *counts_len = pc - counts;
    *payload_len = pp - payload;
    free(bitmap);
    free(buf);
    return status;
}

// ---- decode -------------------------------------------------------------------------------------------

// The varint at *p (advanced past it) -> 0, or -1 when the stream ends inside it or it overflows 63 bits.
static inline int get_varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
    uint64_t x = 0;
    for (int shift = 0; *p < end && shift < 63; shift += 7) {
        uint8_t b = *(*p)++;
        x |= (uint64_t)(b & 127) << shift;
        if (!(b & 128)) { *v = x; return 0; }
    }
    return -1;
}

// A gap-coded ascending run of n numbers from the payload into v (each below `limit`) -> 0, or an error code.
static int get_gaps(const uint8_t **p, const uint8_t *end, int64_t n, int64_t limit, int64_t *v) {
    uint64_t g;
    for (int64_t i = 0; i < n; i++) {
        if (get_varint(p, end, &g)) return 3;
        if (g >= (uint64_t)limit) return 5;
        int64_t x = i == 0 ? (int64_t)g : v[i - 1] + 1 + (int64_t)g;
        if (x >= limit) return 5;
        v[i] = x;
    }
    return 0;
}

// The record's streams -> out [T, L, K] int32 (rows ascending, then -1). Returns 0, or a code that
// cpu.py turns into the reason: 1 modes short, 2 counts, 3 payload (end early or inside a number),
// 4 more than K keys, 5 a number out of range, 6 DELTA without a previous row or past the chain,
// 7 mode 3, 8 DELTA adds a key the row keeps, 9 bytes left over, -1 out of memory.
int decode_rows(const uint8_t *modes, int64_t n_modes, const uint8_t *counts, int64_t counts_len,
                const uint8_t *payload, int64_t payload_len, int64_t T, int64_t L, int64_t K, int64_t chain,
                int32_t *out) {
    int64_t R = T * L;
    if (n_modes * 4 < R) return 1;
    int64_t *buf = malloc(sizeof(int64_t) * (size_t)(2 * K + 1));
    if (!buf) return -1;
    int64_t *rem = buf, *add = buf + K;
    const uint8_t *pc = counts, *ce = counts + counts_len, *pp = payload, *pe = payload + payload_len;
    int64_t n_prev = 0, depth = 0;
    int status = 0;
    for (int64_t r = 0; r < R && !status; r++) {
        int64_t t = r % T, l = r / T;
        int mode = (modes[r >> 2] >> (2 * (r & 3))) & 3;
        int32_t *row = out + (t * L + l) * K;
        uint64_t n = 0, n_rem = 0, n_add = 0;
        if (get_varint(&pc, ce, mode == DELTA ? &n_rem : &n)) { status = 2; break; }
        if (mode == PREFIX) {
            if (n > (uint64_t)K) { status = 4; break; }
            for (int64_t i = 0; i < (int64_t)n; i++) row[i] = (int32_t)i;
            depth = 0;
        } else if (mode == GAPS) {
            if (n > (uint64_t)K) { status = 4; break; }
            if ((status = get_gaps(&pp, pe, (int64_t)n, INT32_MAX, rem))) break;
            for (int64_t i = 0; i < (int64_t)n; i++) row[i] = (int32_t)rem[i];
            depth = 0;
        } else if (mode == DELTA) {
            if (t == 0 || ++depth >= chain) { status = 6; break; }
            if (get_varint(&pc, ce, &n_add)) { status = 2; break; }
            if (n_rem > (uint64_t)n_prev || n_add > (uint64_t)K) { status = 4; break; }
            if ((status = get_gaps(&pp, pe, (int64_t)n_rem, n_prev, rem))) break;
            if ((status = get_gaps(&pp, pe, (int64_t)n_add, INT32_MAX, add))) break;
            n = (uint64_t)n_prev - n_rem + n_add;
            if (n > (uint64_t)K) { status = 4; break; }
            const int32_t *prev = out + ((t - 1) * L + l) * K;
            int64_t i = 0, j = 0, k = 0, m = 0;  // prev, its removed ranks, added, written
            while (i < n_prev || j < (int64_t)n_add) {
                if (i < n_prev && k < (int64_t)n_rem && rem[k] == i) { i++; k++; continue; }
                if (j == (int64_t)n_add || (i < n_prev && prev[i] < add[j])) row[m++] = prev[i++];
                else if (i == n_prev || add[j] < prev[i]) row[m++] = (int32_t)add[j++];
                else { status = 8; break; }
            }
        } else {
            status = 7;
            break;
        }
        for (int64_t i = (int64_t)n; i < K; i++) row[i] = -1;
        n_prev = (int64_t)n;
    }
    if (!status && (pc != ce || pp != pe)) status = 9;
    free(buf);
    return status;
}
