/* Top-k selection on CPU, one score row at a time (contract: reference.py; torch twin: float_first.py).
 *
 * scores [N, S] fp32 (non-finite = not visible) -> out [N, k] int32, best first, -1 padded.
 * Each finite score becomes a 64-bit key: an order-preserving 32-bit image of the float above the
 * slot, so keys are distinct, a larger key is a better score, and among equal scores the later slot
 * wins: the reference's recency tie-break falls out of the ordering itself. A min-heap of the best k
 * keys is kept while scanning; most scores lose to the heap's minimum at a float compare and cost
 * nothing more. The heap is then sorted, best first.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* A lower bound guess for the k-th best score of a row: the (k / STRIDE + k / (2 STRIDE))-th best of every
 * STRIDE-th score. When at least k scores reach it, the top k (and every score tied with the k-th) are
 * among them, so only those candidates go through the heap; otherwise the whole row does. */
#define STRIDE 8

int topk_rows(const float *scores, int32_t *out, int64_t n0, int64_t n1, int64_t S, int64_t k) {
    uint64_t *heap = malloc(sizeof(uint64_t) * (k > 0 ? k : 1));
    int32_t *cand = malloc(sizeof(int32_t) * (S > 0 ? S : 1));
    float *sample = malloc(sizeof(float) * (S / STRIDE + 1));
    if (!heap || !cand || !sample) { free(heap); free(cand); free(sample); return 1; }
    const int64_t ks = k / STRIDE + k / (2 * STRIDE);
    for (int64_t n = n0; n < n1; n++) {
        const float *row = scores + n * S;
        int64_t size = -1;
        if (ks >= 1 && S >= 4 * k) {
            int64_t m = 0;
            for (int64_t s = 0; s < S; s += STRIDE) sample[m++] = row[s];
            if (heap_select(heap, ks, sample, NULL, m) == ks) {
                uint32_t b = (uint32_t)(heap[0] >> 32);
                b = (b & 0x80000000u) ? (b & 0x7fffffffu) : ~b;
                float guess;
                memcpy(&guess, &b, sizeof guess);
                int64_t c = 0;
                for (int64_t s = 0; s < S; s++) {
                    cand[c] = (int32_t)s;
                    c += row[s] >= guess;  /* branch-free: -inf and NaN never pass */
                }
                if (c >= k) size = heap_select(heap, k, row, cand, c);
            }
        }
        if (size < 0) size = heap_select(heap, k, row, NULL, S);
        int32_t *o = out + n * k;
        for (int64_t i = size; i < k; i++) o[i] = -1;
        for (int64_t i = size - 1; i >= 0; i--) {  /* pop the minimum into the last free place */
            o[i] = (int32_t)(heap[0] & 0xffffffffu);
            heap[0] = heap[i];
            sift_down(heap, i, 0);
        }
    }
    free(heap);
    free(cand);
    free(sample);
    return 0;
}
