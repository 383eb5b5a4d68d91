/* Parts of query rows on the process's OpenMP threads: the `*_parts` entries of the C kernels (native.py,
 * run_parts). Part p is rows [bounds[p], bounds[p + 1]); a call runs parts part0 .. part0 + parts - 1.
 *
 * Built with -fopenmp a kernel library links libgomp.so.1, which in a torch process is torch's own copy,
 * already loaded: the parts run on the threads torch's ops just used, which spin waiting for work. A
 * thread pool of dsarl's own shared its core with that spinning worker for milliseconds (perf; the fused
 * indexer at 16 x 512: 18 ms on two threads, 11 ms with the spin off). Without OpenMP the parts run in
 * turn and the caller splits them over its own threads.
 *
 * A one-part call opens no OpenMP region: a region of fewer threads than torch's docks its idle workers,
 * and torch's next op paid for waking them (decode steps 10.0 -> 11.6 ms per token). */
#ifndef DSARL_PARTS_H
#define DSARL_PARTS_H

#include <stdint.h>

int native_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The body of a `*_parts` entry whose arguments include `part0` and `parts`: PART(p) is the call for part
 * p, returning 0 on success; the entry returns the parts' codes OR-ed. */
#define RETURN_PARTS(PART)                                                                                \
    do {                                                                                                  \
        if (parts == 1) return PART(part0);                                                               \
        int rc_ = 0;                                                                                      \
        _Pragma("omp parallel for num_threads(parts) schedule(static, 1) reduction(| : rc_)")            \
        for (int64_t p_ = part0; p_ < part0 + parts; p_++) rc_ |= PART(p_);                               \
        return rc_;                                                                                       \
    } while (0)

#endif
