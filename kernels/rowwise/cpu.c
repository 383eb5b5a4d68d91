/* Row-local ops of the decoder on the CPU: RMSNorm and SwiGLU's silu(gate) * up, forward and backward, fp32.
 *
 * torch runs RMSNorm on the CPU as six ops (pow, mean, add, rsqrt and two multiplies, each a pass over the
 * rows into a fresh buffer, each with its autograd node) and SwiGLU's product as two ops forward and three
 * backward. A decode step's norms are [64, 256]: there the ops' dispatch is the cost (~40 us a norm, 17 norms
 * a step); the learner's [960, 896] products are passes over freshly allocated 3.4 MB buffers. Here each is
 * one pass over a row while it is in L1.
 *
 * Rows are split into parts (../parts.h); the RMSNorm weight gradient is summed per part into its own row of
 * `dw` (the caller adds the parts: results do not depend on thread timing).
 */
#include <math.h>
#include <stdint.h>
#include "../vmath.h"

/* y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps) per row of D; rstd [rows] kept for the backward
 * unless NULL. y may alias x. */
static int rms_norm_fwd_rows(const float *x, const float *w, float *y, float *rstd, int64_t r0, int64_t r1,
                             int64_t D, float eps) {
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = x + r * D;
        float *yr = y + r * D;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < D; j++) ss += xr[j] * xr[j];
        const float rs = 1.f / sqrtf(ss / (float)D + eps);
        if (rstd) rstd[r] = rs;
#pragma omp simd
        for (int64_t j = 0; j < D; j++) yr[j] = xr[j] * rs * w[j];
    }
    return 0;
}

/* With g = dy * w:  dx = rstd * g - x * rstd^3 * mean(g * x)  (d rstd / dx_k = -rstd^3 x_k / D);
 * dw += dy * x * rstd, into this part's row dw. */
static int rms_norm_bwd_rows(const float *x, const float *w, const float *rstd, const float *dy, float *dx,
                             float *dw, int64_t r0, int64_t r1, int64_t D) {
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = x + r * D, *dyr = dy + r * D;
        float *dxr = dx + r * D;
        const float rs = rstd[r];
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < D; j++) dot += dyr[j] * w[j] * xr[j];
        const float c = dot * rs * rs * rs / (float)D;
#pragma omp simd
        for (int64_t j = 0; j < D; j++) {
            dxr[j] = rs * (dyr[j] * w[j]) - xr[j] * c;
            dw[j] += dyr[j] * xr[j] * rs;
        }
    }
    return 0;
}

/* sigmoid(g) from e = exp(-|g|), which never overflows: 1 / (1 + e) for g >= 0, e / (1 + e) below. */
static inline float sigmoid(float g) {
    const float e = exp_nonpositive(-fabsf(g));
    return (g >= 0.f ? 1.f : e) / (1.f + e);
}

/* One element of each op, shared by the fp32 and the bf16 loops so both compute the same fp32 bits. */
static inline float swiglu_one(float g, float u) { return g * sigmoid(g) * u; }

/* du = dh * silu(g);  dg = dh * u * silu'(g), silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g). */
static inline void swiglu_grad_one(float g, float u, float d, float *dg, float *du) {
    const float s = sigmoid(g);
    *du = d * (g * s);
    *dg = d * u * (s * (1.f + g * (1.f - s)));
}

/* bf16 <-> fp32: a bf16 is the high half of an fp32; fp32 -> bf16 rounds to nearest even (torch's rule,
 * NaN -> 0x7fc0), so a bf16 result equals the fp32 result rounded once by torch. */
static inline float bf16_in(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t bf16_out(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* h = silu(g) * u over rows of n; h may alias g or u. */
static int swiglu_fwd_rows(const float *g, const float *u, float *h, int64_t r0, int64_t r1, int64_t n) {
    const int64_t a = r0 * n, b = r1 * n;
#pragma omp simd
    for (int64_t i = a; i < b; i++) h[i] = swiglu_one(g[i], u[i]);
    return 0;
}

static int swiglu_bwd_rows(const float *g, const float *u, const float *dh, float *dg, float *du, int64_t r0,
                           int64_t r1, int64_t n) {
    const int64_t a = r0 * n, b = r1 * n;
#pragma omp simd
    for (int64_t i = a; i < b; i++) swiglu_grad_one(g[i], u[i], dh[i], dg + i, du + i);
    return 0;
}

/* The same on bf16 tensors (a bf16 learner's or sampler's gate and up), fp32 inside: half the bytes read
 * and written, and no fp32 copies of the inputs or the outputs. */
static int swiglu_fwd_rows_bf16(const uint16_t *g, const uint16_t *u, uint16_t *h, int64_t r0, int64_t r1,
                                int64_t n) {
    const int64_t a = r0 * n, b = r1 * n;
#pragma omp simd
    for (int64_t i = a; i < b; i++) h[i] = bf16_out(swiglu_one(bf16_in(g[i]), bf16_in(u[i])));
    return 0;
}

static int swiglu_bwd_rows_bf16(const uint16_t *g, const uint16_t *u, const uint16_t *dh, uint16_t *dg,
                                uint16_t *du, int64_t r0, int64_t r1, int64_t n) {
    const int64_t a = r0 * n, b = r1 * n;
#pragma omp simd
    for (int64_t i = a; i < b; i++) {
        float dgi, dui;
        swiglu_grad_one(bf16_in(g[i]), bf16_in(u[i]), bf16_in(dh[i]), &dgi, &dui);
        dg[i] = bf16_out(dgi);
        du[i] = bf16_out(dui);
    }
    return 0;
}

/* ---- The entries: parts of rows on the process's OpenMP threads (../parts.h). */
#include "../parts.h"

int rms_norm_fwd_parts(const float *x, const float *w, float *y, float *rstd, const int64_t *bounds, int64_t part0,
                       int64_t parts, int64_t D, float eps) {
#define PART(p) rms_norm_fwd_rows(x, w, y, rstd, bounds[p], bounds[(p) + 1], D, eps)
    RETURN_PARTS(PART);
#undef PART
}

int rms_norm_bwd_parts(const float *x, const float *w, const float *rstd, const float *dy, float *dx, float *dw,
                       const int64_t *bounds, int64_t part0, int64_t parts, int64_t D) {
#define PART(p) rms_norm_bwd_rows(x, w, rstd, dy, dx, dw + (p) * D, bounds[p], bounds[(p) + 1], D)
    RETURN_PARTS(PART);
#undef PART
}

int swiglu_fwd_parts(const float *g, const float *u, float *h, const int64_t *bounds, int64_t part0, int64_t parts,
                     int64_t n) {
#define PART(p) swiglu_fwd_rows(g, u, h, bounds[p], bounds[(p) + 1], n)
    RETURN_PARTS(PART);
#undef PART
}

int swiglu_bwd_parts(const float *g, const float *u, const float *dh, float *dg, float *du, const int64_t *bounds,
                     int64_t part0, int64_t parts, int64_t n) {
#define PART(p) swiglu_bwd_rows(g, u, dh, dg, du, bounds[p], bounds[(p) + 1], n)
    RETURN_PARTS(PART);
#undef PART
}

int swiglu_fwd_bf16_parts(const uint16_t *g, const uint16_t *u, uint16_t *h, const int64_t *bounds, int64_t part0,
                          int64_t parts, int64_t n) {
#define PART(p) swiglu_fwd_rows_bf16(g, u, h, bounds[p], bounds[(p) + 1], n)
    RETURN_PARTS(PART);
#undef PART
}

int swiglu_bwd_bf16_parts(const uint16_t *g, const uint16_t *u, const uint16_t *dh, uint16_t *dg, uint16_t *du,
                          const int64_t *bounds, int64_t part0, int64_t parts, int64_t n) {
#define PART(p) swiglu_bwd_rows_bf16(g, u, dh, dg, du, bounds[p], bounds[(p) + 1], n)
    RETURN_PARTS(PART);
#undef PART
}
