"""Builds and loads the plain-C CPU kernels (`kernels/*/cpu.c`) with the system C compiler.

Why C on CPU: memory-bounded torch versions of sparse attention and top-k run as thousands of small
ops per layer (a few query rows at a time, so the gathered rows stay in cache); at long context their
dispatch, index_select / index_add_ copies and masking cost more than the arithmetic. One C loop per query
row does gather, scores, softmax and the weighted sums with the rows in L1.

No torch headers: the library is plain C, built in about a second and loaded with ctypes (which drops
the GIL during a call). A call splits its query rows into up to `torch.get_num_threads()` parts
(`run_parts`): built with -fopenmp, the library runs them on the process's OpenMP threads, which in a
torch process are torch's own (libgomp.so.1, already loaded); where the compiler has no OpenMP it is
built with -fopenmp-simd and the parts run on a pool of Python threads (`parallel`).

The shared object is cached under $DSARL_NATIVE_CACHE (default ~/.cache/dsarl/native) in a folder
per CPU identity (`cpu_identity`: the machine and what `-march=native` enables on it), named by a
hash of the source, compiler and flags: a home directory shared by a cluster of mixed CPUs never hands
an AVX-512 build to a CPU without AVX-512. The sources are found through the package (`source`), so
an installed wheel builds them too when they ship as package data. Without a compiler, or with
DSARL_NATIVE=0, `load` returns None and dispatch.py runs the op's reference; `unavailable_reason`
says why.
"""
import ctypes
import functools
import hashlib
import importlib.resources
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# -std=gnu11, not c11: ISO mode turns off FMA contraction (a*b + c stays a multiply and an add)
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=fast", "-shared", "-fPIC", "-std=gnu11"]
# -fopenmp: a kernel's parts run on the process's OpenMP threads (torch's libgomp; run_parts). A compiler
# without OpenMP (Apple clang) builds with -fopenmp-simd instead, and run_parts uses a thread pool.
OPENMP_FLAGS = (["-fopenmp"], ["-fopenmp-simd"])
HEADERS = ("parts.h", "vmath.h")  # kernels/*.h, shared by the sources

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


@functools.cache
def source(relative: str) -> Path:
    """A C source of the package by its path under kernels/ ("topk/cpu.c"), wherever it is installed."""
    return Path(str(importlib.resources.files(__package__).joinpath(relative)))


@functools.cache
def cpu_identity(cc: str) -> str:
    """"<machine>-<hash>" of the macros `cc -march=native` defines on this CPU (__AVX512F__, __FMA__, ...):
    what the build depends on. Falls back to /proc/cpuinfo's feature flags when the compiler cannot
    print them."""
    proc = subprocess.run([cc, "-march=native", "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True)
    features = "\n".join(sorted(proc.stdout.splitlines())) if proc.returncode == 0 else _cpuinfo_flags()
    return f"{platform.machine() or 'cpu'}-{hashlib.sha256(features.encode()).hexdigest()[:12]}"


def _cpuinfo_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), platform.processor())


def library_path(src: Path, cc: str, cpu: str, flags: list[str] = OPENMP_FLAGS[0]) -> Path:
    """Where the build of `src` by `cc` with `flags` (one of OPENMP_FLAGS) for CPU identity `cpu` is cached."""
    # the headers the kernels include are part of what was built: an edit to one must rebuild
    headers = b"".join(source(h).read_bytes() for h in HEADERS)
    tag = hashlib.sha256(src.read_bytes() + headers + " ".join([cc, *FLAGS, *flags]).encode()).hexdigest()[:16]
    return _cache_dir() / cpu / f"{src.parent.name}_{src.stem}_{tag}.so"


def _build(src: Path, cpu: str | None = None) -> Path:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler on PATH (cc, gcc or clang; or set CC)")
    if not src.is_file():
        raise RuntimeError(f"{src} is missing: the package was installed without its C sources (package data)")
    cpu = cpu or cpu_identity(cc)
    for flags in OPENMP_FLAGS:  # the first that builds
        out = library_path(src, cc, cpu, flags)
        if out.exists():
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    for flags in OPENMP_FLAGS:
        out = library_path(src, cc, cpu, flags)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # build aside, rename: concurrent builds are safe
            tmp_out = Path(tmp) / out.name
            proc = subprocess.run([cc, *FLAGS, *flags, str(src), "-o", str(tmp_out), "-lm"], capture_output=True,
                                  text=True)
            if proc.returncode == 0:
                os.replace(tmp_out, out)
                return out
    raise RuntimeError(f"{cc} failed on {src}:\n{proc.stderr[-2000:]}")


def load(src: Path) -> ctypes.CDLL | None:
    """The compiled library of `src`, or None (DSARL_NATIVE=0, no compiler, build error)."""
    key = str(src)
    with _lock:
        if key not in _libs:
            if os.environ.get("DSARL_NATIVE", "1").strip() == "0":
                _libs[key], _errors[key] = None, "DSARL_NATIVE=0"
            else:
                try:
                    _libs[key] = ctypes.CDLL(str(_build(src)))
                except (RuntimeError, OSError) as e:
                    _libs[key], _errors[key] = None, str(e)
                    # said once per process: the reference gives the same results, but is several times
                    # slower on CPU and holds [T, K, D] gathers, and a user should know why
                    warnings.warn(f"dsarl: C kernel {src.parent.name}/{src.name} unavailable, using the torch "
                                  f"reference (set DSARL_NATIVE=0 to silence): {str(e).splitlines()[0]}",
                                  stacklevel=2)
        return _libs[key]


def require(src: Path, signatures: dict[str, list]) -> ctypes.CDLL:
    """The library of `src` with ctypes argtypes set from `signatures` (once); a RuntimeError that
    says why when it is unavailable (dispatch.py checks `load(src) is not None` before choosing it)."""
    lib = load(src)
    if lib is None:
        raise RuntimeError(f"C kernel {src} is unavailable: {unavailable_reason(src)}")
    if not getattr(lib, "_dsarl_typed", False):
        for name, argtypes in signatures.items():
            getattr(lib, name).argtypes = argtypes
        lib._dsarl_typed = True
    return lib


def available(src: Path) -> bool:
    return load(src) is not None


def unavailable_reason(src: Path) -> str | None:
    load(src)
    return _errors.get(str(src))


def ptr(t: torch.Tensor | ctypes.Array | None) -> ctypes.c_void_p | ctypes.Array:
    """The data pointer of a contiguous CPU tensor (NULL for None; a ctypes array is its own pointer)."""
    if t is None:
        return ctypes.c_void_p(None)
    if isinstance(t, ctypes.Array):
        return t
    assert t.is_contiguous() and t.device.type == "cpu", "native kernels take contiguous CPU tensors"
    return ctypes.c_void_p(t.data_ptr())


def batch_strided(t: torch.Tensor) -> torch.Tensor:
    """t [B, S, D] as a kernel taking a batch stride reads it: each sequence's [S, D] rows contiguous,
    sequences any distance apart. A KV cache's view [:, :S] of its [B, max_len, D] storage is one, and
    handing it over without a copy saves a copy of the whole cache per layer and decode step."""
    B, S, D = t.shape
    if t.device.type == "cpu" and t.stride(-1) == 1 and (S == 1 or t.stride(-2) == D) and t.stride(0) >= S * D:
        return t
    return t.contiguous()


def batch_ptr(t: torch.Tensor) -> ctypes.c_void_p:
    """The data pointer of a batch_strided tensor."""
    B, S, D = t.shape
    assert t.device.type == "cpu" and t.stride(-1) == 1 and (S == 1 or t.stride(-2) == D), \
        "native kernels take [B, S, D] tensors with contiguous [S, D] rows"
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


# Handing rows to another thread costs tens of microseconds: a decode step's sparse attention (B = 32
# rows, 0.66 M multiply-adds) took 105 us on two threads and 80 us inline, at 1.3 M they were 151 against
# 171 us (2 cores, measured with the Python pool before run_parts used OpenMP). Each thread gets at least
# this many multiply-adds, so small calls run on the caller's thread.
MIN_WORK_PER_THREAD = 1 << 19


def thread_count(n: int, work_per_row: int, threads: int | None = None, min_work: int = MIN_WORK_PER_THREAD) -> int:
    """How many threads `parallel` uses for n rows of `work_per_row` multiply-adds each (>= 1), each
    thread getting at least `min_work` of them."""
    threads = threads or torch.get_num_threads()
    return max(1, min(threads, n * max(1, work_per_row) // min_work))


def run_parts(lib, call, n: int, threads: int = 1, work: torch.Tensor | None = None) -> int:
    """Rows [0, n) in `threads` parts (split_rows by `work`) through a C kernel's `*_parts` entry:
    call(bounds, part0, parts) -> return code, bounds a ctypes int64 array [parts + 1] (part p: rows bounds[p] ..
    bounds[p + 1]). A library built with OpenMP runs every part in one call, on the process's OpenMP
    threads (torch's); one without gets a call per part on `parallel`'s threads. -> the parts' return codes
    OR-ed (0: all succeeded)."""
    ranges = split_rows(n, threads, work)
    if not ranges:
        return 0
    # a ctypes array: a third of torch.tensor's cost, which a decode step's small calls notice
    bounds = (ctypes.c_int64 * (len(ranges) + 1))(ranges[0][0], *(b for _, b in ranges))
    if len(ranges) == 1 or lib.native_openmp():
        return call(bounds, 0, len(ranges))
    rc = 0
    for r in parallel(lambda part, a, b: call(bounds, part, 1), n, threads, work):
        rc |= r
    return rc


def parallel(fn, n: int, threads: int = 1, work: torch.Tensor | None = None) -> list:
    """fn(part, row0, row1) over `threads` disjoint row ranges of [0, n) (split by `work`, see
    split_rows), concurrently; -> results."""
    global _pool, _pool_size, _pool_pid
    ranges = split_rows(n, threads, work)
    if len(ranges) <= 1:
        return [fn(i, a, b) for i, (a, b) in enumerate(ranges)]
    with _lock:
        if _pool is None or _pool_pid != os.getpid() or _pool_size < len(ranges) - 1:
            _pool = ThreadPoolExecutor(max_workers=len(ranges) - 1, thread_name_prefix="dsarl-native")
            _pool_size, _pool_pid = len(ranges) - 1, os.getpid()
        pool = _pool
    # the caller's thread takes the first range instead of waiting idle: one hand-off fewer per call
    futures = [pool.submit(fn, i, a, b) for i, (a, b) in enumerate(ranges) if i > 0]
    first = fn(0, *ranges[0])
    return [first] + [f.result() for f in futures]
