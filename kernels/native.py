"""Builds and loads the plain-C CPU kernels (`kernels/*/cpu.c`) with the system C compiler.

Why C on CPU: the torch paths of sparse attention and top-k run as thousands of small ops per layer
(a few query rows at a time, so the gathered rows stay in cache); at 16k tokens their dispatch,
index_select / index_add_ copies and masking cost more than the arithmetic. One C loop per query
row does gather, scores, softmax and the weighted sums with the rows in L1.

No torch headers and no OpenMP: the library is plain C with `#pragma omp simd` loops (-fopenmp-simd
needs no runtime), built in ~1 s, loaded with ctypes, and run on `torch.get_num_threads()` Python
threads over disjoint ranges of query rows (ctypes drops the GIL during the call).

The shared object is cached under $DSARL_NATIVE_CACHE (default ~/.cache/dsarl/native) by a hash of
the source and flags. Without a compiler, or with DSARL_NATIVE=0, `load` returns None and callers
keep their torch path; `unavailable_reason` says why.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# -std=gnu11, not c11: ISO mode turns off FMA contraction (a*b + c stays a multiply and an add)
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-ffp-contract=fast", "-shared", "-fPIC",
         "-std=gnu11"]

_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL | None] = {}
_errors: dict[str, str] = {}
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = -1  # a forked child inherits the pool object but none of its threads


def _cache_dir() -> Path:
    return Path(os.environ.get("DSARL_NATIVE_CACHE", Path.home() / ".cache" / "dsarl" / "native"))


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(source: Path) -> Path:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler on PATH (cc, gcc or clang; or set CC)")
    text = source.read_bytes()
    tag = hashlib.sha256(text + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"{source.parent.name}_{source.stem}_{tag}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # build aside, rename: concurrent builds are safe
        tmp_out = Path(tmp) / out.name
        proc = subprocess.run([cc, *FLAGS, str(source), "-o", str(tmp_out), "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {source}:\n{proc.stderr[-2000:]}")
        os.replace(tmp_out, out)
    return out


def load(source: Path) -> ctypes.CDLL | None:
    """The compiled library of `source`, or None (DSARL_NATIVE=0, no compiler, build error)."""
    key = str(source)
    with _lock:
        if key not in _libs:
            if os.environ.get("DSARL_NATIVE", "1").strip() == "0":
                _libs[key], _errors[key] = None, "DSARL_NATIVE=0"
            else:
                try:
                    _libs[key] = ctypes.CDLL(str(_build(source)))
                except (RuntimeError, OSError) as e:
                    _libs[key], _errors[key] = None, str(e)
                    # said once per process: the torch path still gives the same results, but sparse
                    # attention on CPU is ~2x slower, and a user should know why
                    warnings.warn(f"dsarl: C kernel {source.parent.name}/{source.name} unavailable, using the torch "
                                  f"path (set DSARL_NATIVE=0 to silence): {str(e).splitlines()[0]}", stacklevel=2)
        return _libs[key]


def require(source: Path, signatures: dict[str, list]) -> ctypes.CDLL:
    """The library of `source` with ctypes argtypes set from `signatures` (once); a RuntimeError that
    says why when it is unavailable (callers check `load(source) is not None` to choose a path)."""
    lib = load(source)
    if lib is None:
        raise RuntimeError(f"C kernel {source} is unavailable: {unavailable_reason(source)}")
    if not getattr(lib, "_dsarl_typed", False):
        for name, argtypes in signatures.items():
            getattr(lib, name).argtypes = argtypes
        lib._dsarl_typed = True
    return lib


def unavailable_reason(source: Path) -> str | None:
    load(source)
    return _errors.get(str(source))


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    """The data pointer of a contiguous CPU tensor (NULL for None)."""
    if t is None:
        return ctypes.c_void_p(None)
    assert t.is_contiguous() and t.device.type == "cpu", "native kernels take contiguous CPU tensors"
    return ctypes.c_void_p(t.data_ptr())


def split_rows(n: int, parts: int, work: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """[0, n) in `parts` contiguous ranges of near-equal size (empty ones dropped), or of near-equal
    total `work` (a per-row cost, [n]) when given: causal prefill's query t costs ~t, and equal row
    counts on two threads left one idle for a third of the call (fused indexer at 16k)."""
    parts = max(1, parts)
    if work is None or parts == 1 or n == 0:
        step = -(-n // parts)
        return [(a, min(n, a + step)) for a in range(0, n, step)] if n else []
    cum = work.double().clamp_min(0).add(1e-9).cumsum(0)  # + eps: rows of no work still count as rows
    cuts = torch.searchsorted(cum, cum[-1] * torch.arange(1, parts, dtype=torch.float64) / parts).tolist()
    bounds = [0] + [min(n, c + 1) for c in cuts] + [n]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


# Handing a range to a pool thread costs tens of microseconds; a decode step's whole call (8-16 rows)
# is about that much work, and on two threads it ran 2x slower than inline. Each thread gets at least
# this many multiply-adds (~0.1 ms), so small calls run on the caller's thread alone.
MIN_WORK_PER_THREAD = 1 << 18


def thread_count(n: int, work_per_row: int, threads: int | None = None) -> int:
    """How many threads `parallel` uses for n rows of `work_per_row` multiply-adds each (>= 1)."""
    threads = threads or torch.get_num_threads()
    return max(1, min(threads, n * max(1, work_per_row) // MIN_WORK_PER_THREAD))


def parallel(fn, n: int, threads: int = 1, work: torch.Tensor | None = None) -> list:
    """fn(part, row0, row1) over `threads` disjoint row ranges of [0, n) (split by `work`, see
    split_rows), concurrently; -> results."""
    global _pool, _pool_size, _pool_pid
    ranges = split_rows(n, threads, work)
    if len(ranges) <= 1:
        return [fn(i, a, b) for i, (a, b) in enumerate(ranges)]
    with _lock:
        if _pool is None or _pool_pid != os.getpid() or _pool_size < len(ranges):
            _pool = ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="dsarl-native")
            _pool_size, _pool_pid = len(ranges), os.getpid()
        pool = _pool
    return [f.result() for f in [pool.submit(fn, i, a, b) for i, (a, b) in enumerate(ranges)]]
