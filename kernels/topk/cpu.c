/* Top-k selection on CPU, one score row at a time (contract and tie rule: reference.py).
 *
 * scores [N, S] fp32 (non-finite = not visible) -> out [N, k] int32, best first, -1 padded.
 * Each finite score has an order-preserving 32-bit image (float order == unsigned order; -0.0 folded to
 * +0.0). A guess at the k-th best score from every 8th score keeps ~1.5 k candidates (found with a
 * vector compress on AVX-512); one stable radix sort of (image, slot) by image puts them in order, and
 * reading from the end gives the best first and, among equal scores, the later slot first: the
 * reference's recency tie-break. Rows the guess does not fit go through a min-heap of 64-bit keys
 * (image above slot) instead.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline uint64_t key_of(float x, int64_t slot) {
    x += 0.0f;  /* -0.0 -> +0.0: the two compare equal, so they must tie */
    uint32_t b;
    memcpy(&b, &x, sizeof b);
    b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);  /* monotone: float order == unsigned order */
    return ((uint64_t)b << 32) | (uint64_t)slot;
}

static inline void sift_down(uint64_t *h, int64_t n, int64_t i) {
    const uint64_t v = h[i];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && h[c + 1] < h[c]) c++;
        if (h[c] >= v) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = v;
}

static inline void sift_up(uint64_t *h, int64_t i) {
    const uint64_t v = h[i];
    while (i > 0) {
        const int64_t p = (i - 1) / 2;
        if (h[p] <= v) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = v;
}

/* Pushes scores[slots[i]] (or scores[i] when slots is NULL) for i < n through a min-heap of the k best
 * keys; -> heap size (< k when fewer finite scores). */
static int64_t heap_select(uint64_t *heap, int64_t k, const float *row, const int32_t *slots, int64_t n) {
    int64_t size = 0;
    float floor_score = -INFINITY;  /* score of the heap minimum once the heap is full */
    for (int64_t i = 0; i < n; i++) {
        const int64_t s = slots ? slots[i] : i;
        const float x = row[s];
        if (!isfinite(x) || x < floor_score) continue;
        const uint64_t key = key_of(x, s);
        if (size < k) {
            heap[size] = key;
            sift_up(heap, size++);
        } else if (key > heap[0]) {
            heap[0] = key;
            sift_down(heap, k, 0);
        } else {
            continue;
        }
        if (size == k) {
            uint32_t b = (uint32_t)(heap[0] >> 32);
            b = (b & 0x80000000u) ? (b & 0x7fffffffu) : ~b;  /* back to the float's bits */
            memcpy(&floor_score, &b, sizeof floor_score);
        }
    }
    return size;
}

/* A lower bound guess for the k-th best score of a row: about the (k / STRIDE + k / (2 STRIDE))-th best of
 * every STRIDE-th score. When at least k scores reach it, the top k (and every score tied with the k-th)
 * are among them, so only those candidates are sorted; otherwise the whole row goes through the heap. */
#define STRIDE 8

/* Scratch for select_row: the heap, candidate slots, sample images, and radix-sort buffers. */
typedef struct {
    uint64_t *heap;
    int32_t *cand;
    uint32_t *sample;
    uint64_t *keys, *keys_tmp;
} scratch_t;

#define RADIX_MAX (1 << 14)  /* candidates sorted by radix; more go through the heap */
#define CAND_PAD 16          /* the vector compress stores a whole vector past the last candidate */

static int scratch_alloc(scratch_t *w, int64_t S, int64_t k) {
    w->heap = malloc(sizeof(uint64_t) * (k > 0 ? k : 1));
    w->cand = malloc(sizeof(int32_t) * ((S > 0 ? S : 1) + CAND_PAD));
    /* select_row samples rows shorter than 4k whole (the fused kernel's rows end at their last visible key) */
    const int64_t whole = S < 4 * k ? S : 4 * k;
    w->sample = malloc(sizeof(uint32_t) * ((whole > S / STRIDE ? whole : S / STRIDE) + 1));
    w->keys = malloc(sizeof(uint64_t) * RADIX_MAX);
    w->keys_tmp = malloc(sizeof(uint64_t) * RADIX_MAX);
    return w->heap && w->cand && w->sample && w->keys && w->keys_tmp;
}

static void scratch_free(scratch_t *w) {
    free(w->heap);
    free(w->cand);
    free(w->sample);
    free(w->keys);
    free(w->keys_tmp);
}

static inline uint32_t image_of(float x) { return (uint32_t)(key_of(x, 0) >> 32); }

static inline float float_of(uint32_t b) {
    b = (b & 0x80000000u) ? (b & 0x7fffffffu) : ~b;
    float x;
    memcpy(&x, &b, sizeof x);
    return x;
}

/* A lower edge of the r-th largest of img[0:m) (r >= 1, r <= m): its top 16 bits, found by two byte
 * histograms (an image's top byte is the float's sign and 7 exponent bits, the next byte 1 exponent and
 * 7 mantissa bits, so the edge is within 1/128 of an octave). A heap of r samples cost a mispredicted
 * branch per level and, at k = 256, as much as the radix sort of the candidates (perf). */
static uint32_t rth_largest_edge(const uint32_t *img, int64_t m, int64_t r) {
    int64_t count[256] = {0};
    for (int64_t i = 0; i < m; i++) count[img[i] >> 24]++;
    int d1 = 255;
    for (; d1 > 0 && count[d1] < r; d1--) r -= count[d1];
    memset(count, 0, sizeof count);
    for (int64_t i = 0; i < m; i++)
        if ((int)(img[i] >> 24) == d1) count[(img[i] >> 16) & 255]++;
    int d2 = 255;
    for (; d2 > 0 && count[d2] < r; d2--) r -= count[d2];
    return ((uint32_t)d1 << 24) | ((uint32_t)d2 << 16);
}

/* Slots s < S with row[s] >= x, in ascending order, into cand; -> their count. */
static int64_t slots_at_least(const float *row, int64_t S, float x, int32_t *cand) {
    int64_t c = 0, s = 0;
#if defined(__AVX512F__)
    const __m512 vx = _mm512_set1_ps(x);
    __m512i slots = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; s + 16 <= S; s += 16) {  /* compress to a register and store it whole: cand has CAND_PAD spare */
        const __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + s), vx, _CMP_GE_OQ);
        _mm512_storeu_si512((void *)(cand + c), _mm512_maskz_compress_epi32(m, slots));
        c += __builtin_popcount(m);
        slots = _mm512_add_epi32(slots, _mm512_set1_epi32(16));
    }
#endif
    for (; s < S; s++) {
        cand[c] = (int32_t)s;
        c += row[s] >= x;  /* branch-free: -inf and NaN never pass */
    }
    return c;
}

/* Sorts a[0:n) ascending by their high 32 bits, stably (LSD radix, 8 bits a pass); tmp has room for n.
 * Bytes on which every key agrees are skipped: candidates within a few octaves share the top one. */
static void radix_sort_high(uint64_t *a, uint64_t *tmp, int64_t n) {
    uint64_t all_or = 0, all_and = ~(uint64_t)0;
    for (int64_t i = 0; i < n; i++) all_or |= a[i], all_and &= a[i];
    const uint64_t differ = all_or ^ all_and;
    uint64_t *src = a, *dst = tmp;
    for (int shift = 32; shift < 64; shift += 8) {
        if (((differ >> shift) & 255) == 0) continue;
        int64_t count[257] = {0};
        for (int64_t i = 0; i < n; i++) count[((src[i] >> shift) & 255) + 1]++;
        for (int d = 0; d < 256; d++) count[d + 1] += count[d];
        for (int64_t i = 0; i < n; i++) dst[count[(src[i] >> shift) & 255]++] = src[i];
        uint64_t *t = src;
        src = dst, dst = t;
    }
    if (src != a) memcpy(a, src, sizeof(uint64_t) * n);
}

/* The top k of row[0:S) (non-finite = not visible) into o[0:k), best first, -1 padded. */
static void select_row(const float *row, int64_t S, int64_t k, scratch_t *w, int32_t *o) {
    uint64_t *heap = w->heap;
    /* Short rows (S < 4k: a causal prefill's first queries) sample every score, and the guess is then
     * exact to 16 bits, never too high; they went through the heap before, which perf put at twice the
     * fused indexer's scoring at S = 512, k = 64 (a mispredicted branch per heap level). */
    const int64_t stride = S >= 4 * k ? STRIDE : 1;
    const int64_t ks = stride == 1 ? k : k / STRIDE + k / (2 * STRIDE);
    int64_t size = -1;
    if (ks >= 1 && k <= RADIX_MAX) {
        int64_t m = 0;
        for (int64_t s = 0; s < S; s += stride) {
            w->sample[m] = image_of(row[s]);
            m += isfinite(row[s]) != 0;
        }
        if (stride == 1 && m < ks) {  /* fewer visible keys than k: all of them, best first */
            int64_t c = 0;
            for (int64_t s = 0; s < S; s++)
                if (isfinite(row[s])) w->keys[c++] = key_of(row[s], s);
            radix_sort_high(w->keys, w->keys_tmp, c);
            for (int64_t i = 0; i < c; i++) o[i] = (int32_t)(w->keys[c - 1 - i] & 0xffffffffu);
            for (int64_t i = c; i < k; i++) o[i] = -1;
            return;
        }
        if (m >= ks) {
            const float guess = float_of(rth_largest_edge(w->sample, m, ks));
            const int64_t c = slots_at_least(row, S, guess, w->cand);
            if (c >= k && c <= RADIX_MAX) {
                /* keys = (order-preserving float bits << 32) | slot, in slot order; a stable sort by the
                 * float bits keeps equal scores in slot order, so reading from the end gives the best
                 * first and, among equal scores, the later slot first: the reference's tie-break */
                for (int64_t i = 0; i < c; i++) w->keys[i] = key_of(row[w->cand[i]], w->cand[i]);
                radix_sort_high(w->keys, w->keys_tmp, c);
                for (int64_t i = 0; i < k; i++) o[i] = (int32_t)(w->keys[c - 1 - i] & 0xffffffffu);
                return;
            }
            if (c >= k) size = heap_select(heap, k, row, w->cand, c);
        }
    }
    if (size < 0) size = heap_select(heap, k, row, NULL, S);
    for (int64_t i = size; i < k; i++) o[i] = -1;
    for (int64_t i = size - 1; i >= 0; i--) {  /* pop the minimum into the last free place */
        o[i] = (int32_t)(heap[0] & 0xffffffffu);
        heap[0] = heap[i];
        sift_down(heap, i, 0);
    }
}

int topk_rows(const float *scores, int32_t *out, int64_t n0, int64_t n1, int64_t S, int64_t k) {
    scratch_t w;
    if (!scratch_alloc(&w, S, k)) { scratch_free(&w); return 1; }
    for (int64_t n = n0; n < n1; n++) select_row(scores + n * S, S, k, &w, out + n * k);
    scratch_free(&w);
    return 0;
}

/* ---- Lightning-indexer scores fused with the selection: the [T, S] score matrix is never written. ----
 *
 *   I[t, s] = k_scale[s] * sum_h w[t, h] * ReLU(q[t, h] . k[s])   if 0 <= k_pos[s] <= q_pos[t], else -inf
 *
 * q [N, H, D] (N = B * T rows), w [N, H], kT [B, S_pad / KB, D, KB] (keys in blocks of KB = 2 LANES
 * slots, each block transposed: a vector of LANES keys is one load, the dot products run across keys
 * with no horizontal sums, and a block's D x KB floats are contiguous; S_pad = S rounded up to KB, the
 * padding keys' scores never selected; batch b's blocks start kT_bstride floats after batch b - 1's: a
 * KV cache's mirror of its indexer keys has room for max_len), k_scale [B, S] or NULL,
 * q_pos [N], k_pos [B, S] int64, out [N, k]. When a batch's k_pos is non-decreasing, a query scores only
 * the slots up to its last visible one (binary search): the causal half of prefill is skipped. */
#define LANES 16
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
/* every lane x: gcc makes this one broadcast (from memory when x is a load); `(vf){0} + x` instead
 * cost a scalar add (-0.0 + 0 is not a no-op) and a register broadcast on the FMA port per use */
static inline vf vsplat(float x) { return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }  /* LANES */
static inline vf vrelu(vf x) {
    const vf zero = {0};
    typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));
    const vi pos = x > zero;
    return (vf)((vi)x & pos);
}

#define KB (2 * LANES)

/* Scores of slots [s0, s0 + KB) for two queries a and b (pair = 1) or query a alone (pair = 0: a decode
 * step has one query per sequence, and scoring it as a pair with itself doubled the work), up to 4 heads
 * at a time; kblk is that block of keys, [D, KB]. Each key vector loaded feeds both queries (16 FMA
 * chains): with one query per load the loop waited on the key stream from L2 (perf), at 128 B per 8 FMAs.
 * Always inlined with a constant `pair`, so each form compiles without the other's branches. */
static inline __attribute__((always_inline)) void score_block(float *restrict dsta, float *restrict dstb,
                                                         const float *restrict qa, const float *restrict qb,
                                                         const float *restrict wa, const float *restrict wb,
                                                         const float *restrict kblk, int64_t H, int64_t D,
                                                         int64_t s0, const int pair) {
    vf outa0 = {0}, outa1 = {0}, outb0 = {0}, outb1 = {0};
    for (int64_t h = 0; h < H; h += 4) {
        const int64_t g = H - h < 4 ? H - h : 4;
        const int64_t o1 = h * D + (g > 1) * D, o2 = h * D + (g > 2) * 2 * D, o3 = h * D + (g > 3) * 3 * D;
        const float *a0p = qa + h * D, *a1p = qa + o1, *a2p = qa + o2, *a3p = qa + o3;
        const float *b0p = qb + h * D, *b1p = qb + o1, *b2p = qb + o2, *b3p = qb + o3;
        vf a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0}, a20 = {0}, a21 = {0}, a30 = {0}, a31 = {0};
        vf b00 = {0}, b01 = {0}, b10 = {0}, b11 = {0}, b20 = {0}, b21 = {0}, b30 = {0}, b31 = {0};
        for (int64_t d = 0; d < D; d++) {
            const vf k0 = vload(kblk + d * KB), k1 = vload(kblk + d * KB + LANES);
            vf x = vsplat(a0p[d]);
            a00 += x * k0, a01 += x * k1;
            x = vsplat(a1p[d]), a10 += x * k0, a11 += x * k1;
            x = vsplat(a2p[d]), a20 += x * k0, a21 += x * k1;
            x = vsplat(a3p[d]), a30 += x * k0, a31 += x * k1;
            if (pair) {
                x = vsplat(b0p[d]), b00 += x * k0, b01 += x * k1;
                x = vsplat(b1p[d]), b10 += x * k0, b11 += x * k1;
                x = vsplat(b2p[d]), b20 += x * k0, b21 += x * k1;
                x = vsplat(b3p[d]), b30 += x * k0, b31 += x * k1;
            }
        }
        /* heads past g were computed on a repeated head: weight them 0 */
        outa0 += vsplat(wa[h]) * vrelu(a00), outa1 += vsplat(wa[h]) * vrelu(a01);
        if (pair) outb0 += vsplat(wb[h]) * vrelu(b00), outb1 += vsplat(wb[h]) * vrelu(b01);
        if (g > 1) {
            outa0 += vsplat(wa[h + 1]) * vrelu(a10), outa1 += vsplat(wa[h + 1]) * vrelu(a11);
            if (pair) outb0 += vsplat(wb[h + 1]) * vrelu(b10), outb1 += vsplat(wb[h + 1]) * vrelu(b11);
        }
        if (g > 2) {
            outa0 += vsplat(wa[h + 2]) * vrelu(a20), outa1 += vsplat(wa[h + 2]) * vrelu(a21);
            if (pair) outb0 += vsplat(wb[h + 2]) * vrelu(b20), outb1 += vsplat(wb[h + 2]) * vrelu(b21);
        }
        if (g > 3) {
            outa0 += vsplat(wa[h + 3]) * vrelu(a30), outa1 += vsplat(wa[h + 3]) * vrelu(a31);
            if (pair) outb0 += vsplat(wb[h + 3]) * vrelu(b30), outb1 += vsplat(wb[h + 3]) * vrelu(b31);
        }
    }
    vstore(dsta + s0, outa0);
    vstore(dsta + s0 + LANES, outa1);
    if (pair) {
        vstore(dstb + s0, outb0);
        vstore(dstb + s0 + LANES, outb1);
    }
}

static int64_t visible_end(const int64_t *kp, int64_t S, int sorted, int64_t qp) {
    if (!sorted) return S;
    int64_t lo = 0, hi = S;  /* first slot with k_pos > qp */
    while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (kp[mid] <= qp) lo = mid + 1; else hi = mid;
    }
    return lo;
}

int indexer_topk_rows(const float *q, const float *w, const float *kT, int64_t kT_bstride, const float *k_scale,
                      const int64_t *q_pos, const int64_t *k_pos, int32_t *out, int64_t n0, int64_t n1, int64_t T,
                      int64_t S, int64_t H, int64_t D, int64_t k) {
    scratch_t ws;
    const int64_t S_pad = (S + KB - 1) / KB * KB;
    float *rows = malloc(sizeof(float) * 2 * (S_pad > 0 ? S_pad : 1));
    if (!scratch_alloc(&ws, S, k) || !rows) { scratch_free(&ws); free(rows); return 1; }
    int64_t sorted_b = -1, first_key = 0;  /* first_key: in a sorted batch, the first slot with k_pos >= 0 */
    int sorted = 0;
    for (int64_t n = n0; n < n1;) {
        const int64_t b = n / T;
        const int64_t *kp = k_pos + b * S;
        if (b != sorted_b) {
            sorted = 1;
            for (int64_t s = 1; s < S; s++) sorted &= kp[s] >= kp[s - 1];
            for (first_key = 0; first_key < S && kp[first_key] < 0; first_key++) {}
            sorted_b = b;
        }
        /* queries n and n + 1 together when both are in batch b */
        const int64_t m = (n + 1 < n1 && (n + 1) / T == b) ? 2 : 1;
        int64_t end[2];
        for (int64_t i = 0; i < m; i++) end[i] = visible_end(kp, S, sorted, q_pos[n + i]);
        const int64_t end_max = m == 2 && end[1] > end[0] ? end[1] : end[0];
        const float *qn = q + n * H * D, *wn = w + n * H, *kTb = kT + b * kT_bstride;
        float *row[2] = {rows, rows + S_pad};
        for (int64_t s0 = 0; s0 < end_max; s0 += KB) {  /* may run into padding or past a query's end: rows have room */
            if (m == 2)
                score_block(row[0], row[1], qn, qn + H * D, wn, wn + H, kTb + s0 * D, H, D, s0, 1);
            else  /* a lone query: every one of a decode step's */
                score_block(row[0], row[1], qn, qn, wn, wn, kTb + s0 * D, H, D, s0, 0);
        }
        const float *ks = k_scale ? k_scale + b * S : NULL;
        for (int64_t i = 0; i < m; i++) {
            float *r = row[i];
            const int64_t qp = q_pos[n + i];
            if (ks)
                for (int64_t s = 0; s < end[i]; s++) r[s] *= ks[s];
            if (sorted) {  /* every slot before end is at most qp: only the negative (padding) ones hide */
                for (int64_t s = 0; s < first_key && s < end[i]; s++) r[s] = -INFINITY;
            } else {
                for (int64_t s = 0; s < end[i]; s++)
                    if (kp[s] < 0 || kp[s] > qp) r[s] = -INFINITY;
            }
            select_row(r, end[i], k, &ws, out + (n + i) * k);
        }
        n += m;
    }
    scratch_free(&ws);
    free(rows);
    return 0;
}

/* ---- The entries: parts of rows on the process's OpenMP threads (../parts.h) ---- */
#include "../parts.h"

int topk_parts(const float *scores, int32_t *out, const int64_t *bounds, int64_t part0, int64_t parts, int64_t S,
               int64_t k) {
#define PART(p) topk_rows(scores, out, bounds[p], bounds[(p) + 1], S, k)
    RETURN_PARTS(PART);
#undef PART
}

int indexer_topk_parts(const float *q, const float *w, const float *kT, int64_t kT_bstride, const float *k_scale,
                       const int64_t *q_pos, const int64_t *k_pos, int32_t *out, const int64_t *bounds, int64_t part0,
                       int64_t parts, int64_t T, int64_t S, int64_t H, int64_t D, int64_t k) {
#define PART(p) indexer_topk_rows(q, w, kT, kT_bstride, k_scale, q_pos, k_pos, out, bounds[p], bounds[(p) + 1], T, S, \
                                  H, D, k)
    RETURN_PARTS(PART);
#undef PART
}
