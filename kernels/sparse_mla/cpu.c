/* Sparse MLA attention on CPU, one query row at a time (maths: README.md; definition: reference.py).
 *
 * Layout (all contiguous fp32): q [N, H, D] with N = B * T query rows, kv [B * S, D], idx [N, K]
 * int32 (-1 = empty slot), out [N, H, DV], lse [N, H], probs [N, K] (optional, NULL to skip).
 * Row n belongs to batch b = n / T and reads kv rows b * S + idx[n, j].
 *
 * Each call handles rows [n0, n1), so callers split N over threads; the backward adds its kv
 * gradient into its own dkv buffer (one per thread, summed by the caller): no atomics.
 *
 * Per row, pass 1 computes the H x K score (and, backward, dP) matrix while each gathered kv row is in
 * L1; the exp then runs over contiguous arrays, where the compiler vectorises it; pass 2 re-reads the
 * rows (still in L1/L2: K * D * 4 B = 160 KB at K = 256) for the weighted sums.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "../vmath.h"

/* GNU C vector types (gcc, clang): one register of LANES floats on AVX-512, two or four elsewhere.
 * Plain loops with `omp simd` left gcc 12 emitting scalar FMAs and store-bound reductions here, so the
 * hot loops say what they want. `vload`/`vstore` are unaligned. */
#define LANES 16
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
/* every lane x: gcc makes this one broadcast (from memory when x is a load); `(vf){0} + x` instead
 * cost a scalar add (-0.0 + 0 is not a no-op) and a register broadcast on the FMA port per use */
static inline vf vsplat(float x) { return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }  /* LANES */

static inline float vsum(vf v) {  /* halves added as a tree: 16 -> 8 -> 4 -> scalar */
    vf8 a, b;
    memcpy(&a, &v, sizeof a);
    memcpy(&b, (char *)&v + sizeof a, sizeof b);
    a += b;
    vf4 c, e;
    memcpy(&c, &a, sizeof c);
    memcpy(&e, (char *)&a + sizeof c, sizeof e);
    c += e;
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* Each FMA depends on the last one into the same accumulator (4 cycles), so the loops below keep
 * G heads x 2 accumulators (or column chunks) independent: 8 chains in flight at G = 4, where one or two
 * chains left the FMA units idle most of the time. G is a literal at every call, so the arrays of
 * vectors stay in registers. */
#define INLINE static inline __attribute__((always_inline))

/* out[g * out_stride] = scale * q[g] . row for g < G (q rows of length D, stride D). The accumulators
 * are named variables: as an array gcc 12 kept them on the stack. */
INLINE void dots_group(float *restrict out, int64_t out_stride, const float *restrict q, const float *restrict row,
                       int64_t D, float scale, const int G) {
    vf a0 = {0}, b0 = {0}, a1 = {0}, b1 = {0}, a2 = {0}, b2 = {0}, a3 = {0}, b3 = {0};
    const float *q0 = q, *q1 = q + (G > 1) * D, *q2 = q + (G > 2) * 2 * D, *q3 = q + (G > 3) * 3 * D;
    int64_t d = 0;
    for (; d + 2 * LANES <= D; d += 2 * LANES) {
        const vf r0 = vload(row + d), r1 = vload(row + d + LANES);
        a0 += vload(q0 + d) * r0, b0 += vload(q0 + d + LANES) * r1;
        if (G > 1) a1 += vload(q1 + d) * r0, b1 += vload(q1 + d + LANES) * r1;
        if (G > 2) a2 += vload(q2 + d) * r0, b2 += vload(q2 + d + LANES) * r1;
        if (G > 3) a3 += vload(q3 + d) * r0, b3 += vload(q3 + d + LANES) * r1;
    }
    for (; d + LANES <= D; d += LANES) {
        const vf r0 = vload(row + d);
        a0 += vload(q0 + d) * r0;
        if (G > 1) a1 += vload(q1 + d) * r0;
        if (G > 2) a2 += vload(q2 + d) * r0;
        if (G > 3) a3 += vload(q3 + d) * r0;
    }
    float t[4] = {vsum(a0 + b0), vsum(a1 + b1), vsum(a2 + b2), vsum(a3 + b3)};
    for (; d < D; d++) {
        t[0] += q0[d] * row[d];
        if (G > 1) t[1] += q1[d] * row[d];
        if (G > 2) t[2] += q2[d] * row[d];
        if (G > 3) t[3] += q3[d] * row[d];
    }
    for (int g = 0; g < G; g++) out[g * out_stride] = scale * t[g];
}

/* out[h * out_stride] = scale * q[h] . row for h < H (q rows H x D, stride D). */
static inline void dots(float *restrict out, int64_t out_stride, const float *restrict q, const float *restrict row,
                        int64_t H, int64_t D, float scale) {
    int64_t h = 0;
    for (; h + 4 <= H; h += 4) dots_group(out + h * out_stride, out_stride, q + h * D, row, D, scale, 4);
    if (H - h >= 2) dots_group(out + h * out_stride, out_stride, q + h * D, row, D, scale, 2), h += 2;
    if (H - h == 1) dots_group(out + h * out_stride, out_stride, q + h * D, row, D, scale, 1);
}

/* Gathered rows come from L3 or memory in random order, which the hardware prefetcher cannot follow:
 * ask for row j + PREFETCH_AHEAD while row j is computed on (16 lines in flight per 64 B line). */
#define PREFETCH_AHEAD 8
static inline void prefetch_row(const float *kvb, const int32_t *ix, int64_t j, int64_t K, int64_t D) {
    if (j < K && ix[j] >= 0) {
        const char *r = (const char *)(kvb + (int64_t)ix[j] * D);
        /* the empty asm keeps the loop: gcc 12 deletes a loop whose body is only __builtin_prefetch
         * (no side effects), so until it was there no prefetch was ever issued */
        for (int64_t b = 0; b < D * (int64_t)sizeof(float); b += 64) {
            __builtin_prefetch(r + b);
            __asm__ volatile("");
        }
    }
}

/* out[g * out_stride + c] = sum_j w[g * K + j] * rows[j][c] for g < G, c in [c0, c0 + 2 LANES). */
INLINE void weighted_rows_group(float *restrict out, int64_t out_stride, const float *restrict w,
                                const float *const *rows, int64_t K, int64_t c0, const int G) {
    vf a0 = {0}, b0 = {0}, a1 = {0}, b1 = {0}, a2 = {0}, b2 = {0}, a3 = {0}, b3 = {0};
    const float *w0 = w, *w1 = w + (G > 1) * K, *w2 = w + (G > 2) * 2 * K, *w3 = w + (G > 3) * 3 * K;
    for (int64_t j = 0; j < K; j++) {
        const vf r0 = vload(rows[j] + c0), r1 = vload(rows[j] + c0 + LANES);
        vf x = vsplat(w0[j]);
        a0 += x * r0, b0 += x * r1;
        if (G > 1) x = vsplat(w1[j]), a1 += x * r0, b1 += x * r1;
        if (G > 2) x = vsplat(w2[j]), a2 += x * r0, b2 += x * r1;
        if (G > 3) x = vsplat(w3[j]), a3 += x * r0, b3 += x * r1;
    }
    vstore(out + c0, a0), vstore(out + c0 + LANES, b0);
    if (G > 1) vstore(out + out_stride + c0, a1), vstore(out + out_stride + c0 + LANES, b1);
    if (G > 2) vstore(out + 2 * out_stride + c0, a2), vstore(out + 2 * out_stride + c0 + LANES, b2);
    if (G > 3) vstore(out + 3 * out_stride + c0, a3), vstore(out + 3 * out_stride + c0 + LANES, b3);
}

/* The same for one chunk of LANES columns, c in [c0, c0 + LANES): the tail of a width that is not a multiple
 * of 2 LANES. The backward's dq has the query's width D = kv_lora_rank + rope, 80 in the bench models
 * (64 + 16; DeepSeek-V3.2's 576 has no tail): a scalar loop over strided rows for those 16 columns was
 * half of the whole backward (8 x 1000 queries, K = 256: 122 -> 59 ms). Two accumulators per head, over
 * even and odd j, keep the FMA chains apart. */
INLINE void weighted_rows_tail_group(float *restrict out, int64_t out_stride, const float *restrict w,
                                     const float *const *rows, int64_t K, int64_t c0, const int G) {
    vf a0 = {0}, b0 = {0}, a1 = {0}, b1 = {0}, a2 = {0}, b2 = {0}, a3 = {0}, b3 = {0};
    const float *w0 = w, *w1 = w + (G > 1) * K, *w2 = w + (G > 2) * 2 * K, *w3 = w + (G > 3) * 3 * K;
    int64_t j = 0;
    for (; j + 2 <= K; j += 2) {
        const vf r0 = vload(rows[j] + c0), r1 = vload(rows[j + 1] + c0);
        a0 += vsplat(w0[j]) * r0, b0 += vsplat(w0[j + 1]) * r1;
        if (G > 1) a1 += vsplat(w1[j]) * r0, b1 += vsplat(w1[j + 1]) * r1;
        if (G > 2) a2 += vsplat(w2[j]) * r0, b2 += vsplat(w2[j + 1]) * r1;
        if (G > 3) a3 += vsplat(w3[j]) * r0, b3 += vsplat(w3[j + 1]) * r1;
    }
    if (j < K) {
        const vf r0 = vload(rows[j] + c0);
        a0 += vsplat(w0[j]) * r0;
        if (G > 1) a1 += vsplat(w1[j]) * r0;
        if (G > 2) a2 += vsplat(w2[j]) * r0;
        if (G > 3) a3 += vsplat(w3[j]) * r0;
    }
    vstore(out + c0, a0 + b0);
    if (G > 1) vstore(out + out_stride + c0, a1 + b1);
    if (G > 2) vstore(out + 2 * out_stride + c0, a2 + b2);
    if (G > 3) vstore(out + 3 * out_stride + c0, a3 + b3);
}

/* out[h * out_stride + c] = sum_j w[h * K + j] * rows[j][c] for h < H, c < n: a [H, K] x [K, n] product
 * over gathered rows, 2 LANES columns and up to 4 heads at a time summed over j in registers
 * (accumulating row by row into `out`, an axpy per (j, h), was bound by the stores). */
static void weighted_rows(float *restrict out, int64_t out_stride, const float *restrict w,
                          const float *const *rows, int64_t H, int64_t K, int64_t n) {
    int64_t c = 0;
    for (; c + 2 * LANES <= n; c += 2 * LANES) {
        int64_t h = 0;
        for (; h + 4 <= H; h += 4) weighted_rows_group(out + h * out_stride, out_stride, w + h * K, rows, K, c, 4);
        if (H - h >= 2) weighted_rows_group(out + h * out_stride, out_stride, w + h * K, rows, K, c, 2), h += 2;
        if (H - h == 1) weighted_rows_group(out + h * out_stride, out_stride, w + h * K, rows, K, c, 1);
    }
    for (; c + LANES <= n; c += LANES) {
        int64_t h = 0;
        for (; h + 4 <= H; h += 4) weighted_rows_tail_group(out + h * out_stride, out_stride, w + h * K, rows, K, c, 4);
        if (H - h >= 2) weighted_rows_tail_group(out + h * out_stride, out_stride, w + h * K, rows, K, c, 2), h += 2;
        if (H - h == 1) weighted_rows_tail_group(out + h * out_stride, out_stride, w + h * K, rows, K, c, 1);
    }
    for (; c < n; c++)  /* columns past the last multiple of LANES */
        for (int64_t h = 0; h < H; h++) {
            float acc = 0.f;
            for (int64_t j = 0; j < K; j++) acc += w[h * K + j] * rows[j][c];
            out[h * out_stride + c] = acc;
        }
}

/* dst[c] += sum_h a[h * K] * x[h * ld + c] for c < n (x rows H x n, ld floats apart): a [1, H] x [H, n]
 * product added to one row, four column chunks at a time (four independent chains over h). */
static inline void add_mixed_rows(float *restrict dst, const float *restrict a, int64_t K, const float *restrict x,
                                  int64_t H, int64_t n, int64_t ld) {
    int64_t c = 0;
    for (; c + 4 * LANES <= n; c += 4 * LANES) {
        vf acc[4];
        for (int u = 0; u < 4; u++) acc[u] = vload(dst + c + u * LANES);
        for (int64_t h = 0; h < H; h++) {
            const vf ah = vsplat(a[h * K]);
            for (int u = 0; u < 4; u++) acc[u] += ah * vload(x + h * ld + c + u * LANES);
        }
        for (int u = 0; u < 4; u++) vstore(dst + c + u * LANES, acc[u]);
    }
    for (; c + LANES <= n; c += LANES) {
        vf acc = vload(dst + c);
        for (int64_t h = 0; h < H; h++) acc += vsplat(a[h * K]) * vload(x + h * ld + c);
        vstore(dst + c, acc);
    }
    for (; c < n; c++) {
        float acc = 0.f;
        for (int64_t h = 0; h < H; h++) acc += a[h * K] * x[h * ld + c];
        dst[c] += acc;
    }
}

/* One kv row's gradient from one query: dst[c] += sum_h p[h * K] * dout[h * DV + c] for c < DV (the value
 * part), then dst[c] += sum_h ds[h * K] * q[h * D + c] for c < D (the key part), DV <= D. One read and one
 * write of the row, where two add_mixed_rows calls made two of each (the row is gathered, so it comes
 * from L2/L3); per column the additions happen in the same order, so the bits are those of the two calls. */
static inline void add_value_key_rows(float *restrict dst, const float *restrict p, const float *restrict ds,
                                      int64_t K, const float *restrict dout, const float *restrict q, int64_t H,
                                      int64_t DV, int64_t D) {
    int64_t c = 0;
    for (; c + 4 * LANES <= DV; c += 4 * LANES) {
        vf acc[4];
        for (int u = 0; u < 4; u++) acc[u] = vload(dst + c + u * LANES);
        for (int64_t h = 0; h < H; h++) {
            const vf ph = vsplat(p[h * K]);
            for (int u = 0; u < 4; u++) acc[u] += ph * vload(dout + h * DV + c + u * LANES);
        }
        for (int64_t h = 0; h < H; h++) {
            const vf dh = vsplat(ds[h * K]);
            for (int u = 0; u < 4; u++) acc[u] += dh * vload(q + h * D + c + u * LANES);
        }
        for (int u = 0; u < 4; u++) vstore(dst + c + u * LANES, acc[u]);
    }
    for (; c + LANES <= DV; c += LANES) {
        vf acc = vload(dst + c);
        for (int64_t h = 0; h < H; h++) acc += vsplat(p[h * K]) * vload(dout + h * DV + c);
        for (int64_t h = 0; h < H; h++) acc += vsplat(ds[h * K]) * vload(q + h * D + c);
        vstore(dst + c, acc);
    }
    /* the columns past the last whole vector of the value part, in the two-pass order */
    add_mixed_rows(dst + c, p, K, dout + c, H, DV - c, DV);
    add_mixed_rows(dst + c, ds, K, q + c, H, D - c, D);
}

/* s[i] = exp(s[i] - m) in place for i < n, with s[i] <= m; s = -inf gives 0 (m finite). */
static inline void exp_shifted(float *s, float m, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) s[i] = exp_nonpositive(s[i] - m);
}

static inline float row_max(const float *x, int64_t n) {
    vf m = vsplat(-INFINITY);
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const vf v = vload(x + i);
        const vi take = v > m;  /* all-ones lanes where v is larger (C has no vector ?:) */
        m = (vf)(((vi)v & take) | ((vi)m & ~take));
    }
    float r = -INFINITY;
    for (int l = 0; l < LANES; l++) r = m[l] > r ? m[l] : r;
    for (; i < n; i++) r = x[i] > r ? x[i] : r;
    return r;
}

static inline float row_sum(const float *x, int64_t n) {
    vf acc = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) acc += vload(x + i);
    float r = vsum(acc);
    for (; i < n; i++) r += x[i];
    return r;
}

int sparse_mla_fwd(const float *q, const float *kv, const int32_t *idx, float *out, float *lse, float *probs,
                   int64_t n0, int64_t n1, int64_t T, int64_t S, int64_t H, int64_t K, int64_t D, int64_t DV,
                   int64_t kv_bstride, float scale) {
    /* kv_bstride: floats between sequences (S * D when contiguous; a KV cache view's max_len * D) */
    float *s = malloc(sizeof(float) * H * K);
    const float **rows = malloc(sizeof(float *) * K);
    if (!s || !rows) { free(s); free(rows); return 1; }
    for (int64_t n = n0; n < n1; n++) {
        const float *qn = q + n * H * D;
        const int32_t *ix = idx + n * K;
        const float *kvb = kv + (n / T) * kv_bstride;
        for (int64_t j = 0; j < K; j++) {
            prefetch_row(kvb, ix, j + PREFETCH_AHEAD, K, D);
            rows[j] = kvb + (ix[j] >= 0 ? (int64_t)ix[j] : 0) * D;  /* empty slots: row 0, weight 0 */
            if (ix[j] >= 0)
                dots(s + j, K, qn, rows[j], H, D, scale);
            else
                for (int64_t h = 0; h < H; h++) s[h * K + j] = -INFINITY;
        }
        for (int64_t h = 0; h < H; h++) {
            float *sh = s + h * K;
            const float m = row_max(sh, K);
            if (m == -INFINITY) {  /* nothing selected: out 0, lse -inf, p 0 */
                lse[n * H + h] = -INFINITY;
                memset(sh, 0, sizeof(float) * K);
                continue;
            }
            exp_shifted(sh, m, K);
            const float l = row_sum(sh, K);
            float inv = 1.f / l;
#pragma omp simd
            for (int64_t j = 0; j < K; j++) sh[j] *= inv;
            lse[n * H + h] = m + logf(l);
        }
        weighted_rows(out + n * H * DV, DV, s, rows, H, K, DV);
        if (probs) {
            float *pn = probs + n * K;
            memset(pn, 0, sizeof(float) * K);
            for (int64_t h = 0; h < H; h++)
#pragma omp simd
                for (int64_t j = 0; j < K; j++) pn[j] += s[h * K + j];
        }
    }
    free(s);
    free(rows);
    return 0;
}

/* delta [N, H] = rowsum(out * dout) - dlse. dq [N, H, D] is written; dkv [B * S, D] is added to. */
int sparse_mla_bwd(const float *q, const float *kv, const int32_t *idx, const float *lse, const float *dout,
                   const float *delta, float *dq, float *dkv, int64_t n0, int64_t n1, int64_t T, int64_t S,
                   int64_t H, int64_t K, int64_t D, int64_t DV, float scale) {
    float *p = malloc(sizeof(float) * H * K);
    float *ds = malloc(sizeof(float) * H * K);
    const float **rows = malloc(sizeof(float *) * K);
    if (!p || !ds || !rows) { free(p); free(ds); free(rows); return 1; }
    for (int64_t n = n0; n < n1; n++) {
        const float *qn = q + n * H * D, *don = dout + n * H * DV;
        const int32_t *ix = idx + n * K;
        const int64_t base = (n / T) * S;
        for (int64_t j = 0; j < K; j++) {
            prefetch_row(kv + base * D, ix, j + PREFETCH_AHEAD, K, D);
            rows[j] = kv + (base + (ix[j] >= 0 ? ix[j] : 0)) * D;  /* empty slots: row 0, p = ds = 0 */
            if (ix[j] >= 0) {
                dots(p + j, K, qn, rows[j], H, D, scale);
                dots(ds + j, K, don, rows[j], H, DV, 1.f);  /* dP for now */
            } else {
                for (int64_t h = 0; h < H; h++) p[h * K + j] = -INFINITY, ds[h * K + j] = 0.f;
            }
        }
        for (int64_t h = 0; h < H; h++) {
            float *ph = p + h * K, *dsh = ds + h * K;
            const float m = lse[n * H + h], dl = delta[n * H + h];
            if (m == -INFINITY) {  /* empty row: no gradient */
                memset(ph, 0, sizeof(float) * K);
                memset(dsh, 0, sizeof(float) * K);
                continue;
            }
            exp_shifted(ph, m, K);
#pragma omp simd
            for (int64_t j = 0; j < K; j++) dsh[j] = ph[j] * (dsh[j] - dl) * scale;
        }
        weighted_rows(dq + n * H * D, D, ds, rows, H, K, D);  /* dq[h] = sum_j ds[h, j] kv_j */
        for (int64_t j = 0; j < K; j++) {
            if (ix[j] < 0) continue;
            if (j + PREFETCH_AHEAD < K && ix[j + PREFETCH_AHEAD] >= 0)
                prefetch_row(dkv + base * D, ix, j + PREFETCH_AHEAD, K, D);
            float *drow = dkv + (base + ix[j]) * D;
            /* value part sum_h p[h, j] dout[h], then key part sum_h ds[h, j] q[h] */
            add_value_key_rows(drow, p + j, ds + j, K, don, qn, H, DV, D);
        }
    }
    free(p);
    free(ds);
    free(rows);
    return 0;
}

/* ---- The entries: parts of rows on the process's OpenMP threads (../parts.h). The backward's part p
 * adds into its own buffer dkv + p * dkv_part (the caller sums them in part order: results do not depend
 * on thread timing). ---- */
#include "../parts.h"

int sparse_mla_fwd_parts(const float *q, const float *kv, const int32_t *idx, float *out, float *lse, float *probs,
                         const int64_t *bounds, int64_t part0, int64_t parts, int64_t T, int64_t S, int64_t H,
                         int64_t K, int64_t D, int64_t DV, int64_t kv_bstride, float scale) {
#define PART(p) sparse_mla_fwd(q, kv, idx, out, lse, probs, bounds[p], bounds[(p) + 1], T, S, H, K, D, DV, \
                               kv_bstride, scale)
    RETURN_PARTS(PART);
#undef PART
}

int sparse_mla_bwd_parts(const float *q, const float *kv, const int32_t *idx, const float *lse, const float *dout,
                         const float *delta, float *dq, float *dkv, int64_t dkv_part, const int64_t *bounds,
                         int64_t part0, int64_t parts, int64_t T, int64_t S, int64_t H, int64_t K, int64_t D,
                         int64_t DV, float scale) {
#define PART(p) sparse_mla_bwd(q, kv, idx, lse, dout, delta, dq, dkv + (p) * dkv_part, bounds[p], bounds[(p) + 1], \
                               T, S, H, K, D, DV, scale)
    RETURN_PARTS(PART);
#undef PART
}
