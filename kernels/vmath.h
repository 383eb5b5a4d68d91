/* Vector-friendly maths shared by the C kernels: functions the compiler inlines and vectorises inside
 * `omp simd` loops, where libm's scalar calls would not. Part of every kernel's build hash (native.py). */
#ifndef DSARL_VMATH_H
#define DSARL_VMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(x) for x <= 0 in a form the compiler vectorises (libm's expf is a scalar call here):
 * x = (n + f) ln2 with n = round(x log2 e), |f| <= 1/2; 2^f by its degree-7 Taylor polynomial in f ln2
 * (relative error < 1e-8 on |f ln2| <= 0.35); 2^n built in the exponent bits. exp(x < -87) = 0. */
static inline float exp_nonpositive(float x) {
    const float t = (x > -87.f ? x : -87.f) * 1.44269504088896341f;
    const float n = rintf(t);
    const float y = (t - n) * 0.693147180559945309f;
    float r = 1.f / 5040.f;
    r = r * y + 1.f / 720.f;
    r = r * y + 1.f / 120.f;
    r = r * y + 1.f / 24.f;
    r = r * y + 1.f / 6.f;
    r = r * y + 0.5f;
    r = r * y + 1.f;
    r = r * y + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return x < -87.f ? 0.f : r * two_n;
}

#endif
