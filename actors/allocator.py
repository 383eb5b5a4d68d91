"""Large CPU tensors come back from the heap instead of fresh pages (glibc's malloc), in dsarl's actors.

glibc serves an allocation above its mmap threshold with a fresh mmap and unmaps it on free. The threshold
adapts upwards to at most 32 MB, so a long-context step's bigger activations ([32k tokens, 896] fp32 is
115 MB) are new pages every time: the kernel faults in and zeroes each 4 KB page on first touch. A sparse
GRPO update at 8 x 4000 tokens took about 600k minor page faults (2.4 GB zeroed) and 10.0-10.9 s; with
the heap kept, 0-24k faults and 8.5-9.9 s (interleaved processes, 2 cores). The peak RSS barely moves
(the same in-process, 2-7% higher for bench/grpo_step.py's learner): the memory freed after a step is the
memory the next step needs.

`keep_freed_memory()` sets the mmap threshold and the trim threshold to 1 GB (allocations below it come
from the heap; up to that much free heap is kept, not returned to the system) and grows the heap 64 MB at
a time. Called first thing by the learner and rollout actors, next to `follow_cpu_share`; per process,
in a Ray actor only (the driver's or a test's process is not ours to tune; a bench that runs the actors'
work in one process asks with `anywhere=True`, or it measures page faults the actors never take), glibc
only (elsewhere, or with DSARL_KEEP_FREED_MEMORY=0, it does nothing).
"""
import ctypes
import os
import platform

from .threads import assigned_cpus

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters, glibc's malloc.h
KEEP_BYTES = 1 << 30
TOP_PAD_BYTES = 64 << 20
ENV = "DSARL_KEEP_FREED_MEMORY"


def keep_freed_memory(anywhere: bool = False) -> bool:
    """Tune this process's glibc malloc as the module docstring says -> True when it was tuned.
    anywhere: also outside a Ray actor."""
    if os.environ.get(ENV, "1").strip() == "0" or platform.libc_ver()[0] != "glibc" or (
            assigned_cpus() is None and not anywhere):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success; setting the mmap threshold also stops glibc adapting it
    return all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, KEEP_BYTES), (_M_TRIM_THRESHOLD, KEEP_BYTES), (_M_TOP_PAD, TOP_PAD_BYTES)))
