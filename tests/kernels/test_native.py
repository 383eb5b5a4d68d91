"""The C kernels' build, cache and fallback (kernels/native.py). Switching them off or breaking the
compiler runs in fresh interpreters: the library is loaded once per process."""
import os
import subprocess
import sys

import pytest

PROBE = r"""
import torch
from dsarl.kernels import dispatch, native, sparse_mla_attention
from dsarl.kernels.sparse_mla import cpu
from dsarl.kernels.sparse_mla.reference import sparse_mla_attention_reference
g = torch.Generator().manual_seed(0)
q, kv = torch.randn(1, 9, 3, 24, generator=g), torch.randn(1, 9, 24, generator=g)
idx = torch.randint(-1, 9, (1, 9, 5), generator=g, dtype=torch.int32)
got, ref = sparse_mla_attention(q, kv, idx, 0.3, 16)[0], sparse_mla_attention_reference(q, kv, idx, 0.3, 16)[0]
print("AVAILABLE", native.available(cpu.SOURCE))
print("BACKEND", dispatch.choose_backend("sparse_mla", q))
print("REASON", str(native.unavailable_reason(cpu.SOURCE)).replace("\n", " "))
print("ERR", float((got - ref).abs().max()))
"""


def _probe(tmp_path, **env) -> dict[str, str]:
    full = {**os.environ, "DSARL_NATIVE_CACHE": str(tmp_path / "cache"), **env}
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return {**dict(line.split(" ", 1) for line in out.stdout.splitlines()), "STDERR": out.stderr}


def test_switched_off_falls_back_to_torch(tmp_path):
    got = _probe(tmp_path, DSARL_NATIVE="0")
    assert got["AVAILABLE"] == "False" and got["REASON"] == "DSARL_NATIVE=0"
    assert "unavailable" not in got["STDERR"]  # switched off on purpose: no warning
    assert got["BACKEND"] == "reference"
    assert float(got["ERR"]) <= 1e-5  # the public op still answers, through the reference
    assert not (tmp_path / "cache").exists()  # nothing was built


def test_a_failing_compiler_is_reported_and_the_op_still_works(tmp_path):
    got = _probe(tmp_path, CC="false")  # /bin/false: a compiler that always fails
    assert got["AVAILABLE"] == "False" and "false failed" in got["REASON"]
    assert got["STDERR"].count("sparse_mla/cpu.c unavailable, using the torch reference") == 1  # once, not per call
    assert got["BACKEND"] == "reference" and float(got["ERR"]) <= 1e-5


OPENMP_PROBE = r"""
import torch
from dsarl.kernels import native
from dsarl.kernels.sparse_mla import cpu as mla
from dsarl.kernels.sparse_mla.reference import sparse_mla_attention_reference
from dsarl.kernels.topk import cpu as topk
from dsarl.kernels.topk.reference import topk_indices_reference
native.MIN_WORK_PER_THREAD = 1  # split even these small calls into parts
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
q = torch.randn(2, 40, 3, 24, generator=g, requires_grad=True)
kv = torch.randn(2, 40, 24, generator=g, requires_grad=True)
idx = torch.randint(-1, 40, (2, 40, 8), generator=g, dtype=torch.int32)
out = mla.sparse_mla_attention_cpu(q, kv, idx, 0.3, 16)[0]
dq, dkv = torch.autograd.grad(out.square().sum(), (q, kv))
ref = sparse_mla_attention_reference(q, kv, idx, 0.3, 16)[0]
rq, rkv = torch.autograd.grad(ref.square().sum(), (q, kv))
scores = torch.randperm(2 * 40 * 300, generator=g).float().view(2, 40, 300)
print("OPENMP", mla._lib().native_openmp(), topk._lib().native_openmp())
print("GOMP", len({l.split()[-1] for l in open("/proc/self/maps") if "libgomp" in l}))
print("ERR", max(float((a - b).abs().max()) for a, b in [(out, ref), (dq, rq), (dkv, rkv)]))
print("TOPK", bool(torch.equal(topk.topk_indices_cpu(scores, 24), topk_indices_reference(scores, 24))))
"""


@pytest.mark.parametrize("openmp_compiles", [True, False])
def test_kernels_run_their_parts_on_torchs_openmp_threads_or_without_openmp(tmp_path, openmp_compiles):
    """Built with -fopenmp, the parts of a call run on the process's OpenMP threads, through the libgomp
    torch already loaded (one copy in the process); a compiler that cannot -fopenmp (Apple clang) gets
    a -fopenmp-simd build whose parts run on Python threads. Both answer as the reference does."""
    import shutil

    cc = tmp_path / "cc"
    real = shutil.which("cc") or shutil.which("gcc")
    refuse = "" if openmp_compiles else 'for a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\n'
    cc.write_text(f"#!/bin/sh\n{refuse}exec {real} \"$@\"\n")
    cc.chmod(0o755)
    env = {**os.environ, "DSARL_NATIVE_CACHE": str(tmp_path / "cache"), "CC": str(cc)}
    out = subprocess.run([sys.executable, "-c", OPENMP_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert got["OPENMP"] == ("1 1" if openmp_compiles else "0 0")
    assert got["GOMP"] == "1"  # torch's libgomp only: never a second OpenMP runtime beside it
    assert float(got["ERR"]) <= 1e-4 and got["TOPK"] == "True"
    assert "unavailable" not in out.stderr


def test_split_rows_by_work_covers_every_row_once_and_balances_the_work():
    import torch

    from dsarl.kernels import native

    g = torch.Generator().manual_seed(3)
    cases = [torch.arange(1, 1001).double(),  # causal prefill: row t costs t
             torch.rand(777, generator=g).double() * 50,
             torch.cat([torch.zeros(40), torch.full((3,), 100.0), torch.zeros(40)]).double()]
    for work in cases:
        for parts in (1, 2, 3, 7):
            ranges = native.split_rows(len(work), parts, work)
            assert ranges[0][0] == 0 and ranges[-1][1] == len(work) and len(ranges) <= parts
            assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
            sums = [float(work[a:b].sum()) for a, b in ranges]
            # each range stops at the first row reaching its share: it overshoots by less than one row
            assert max(sums) <= float(work.sum()) / parts + float(work.max()) + 1e-6
    equal = native.split_rows(1000, 2, torch.arange(1, 1001).double())
    assert 690 <= equal[0][1] <= 720  # half of sum(t) lies at t ~ 1000 / sqrt(2) = 707, not at 500
    assert native.split_rows(10, 3) == [(0, 4), (4, 8), (8, 10)]  # no work: equal row counts


def test_parallel_runs_the_first_range_on_the_callers_thread_and_every_range_once():
    import threading

    from dsarl.kernels import native

    for n, threads in [(10, 1), (10, 2), (11, 3), (2, 4)]:
        calls = []

        def fn(part, a, b):
            calls.append((part, a, b, threading.get_ident()))
            return part * 1000 + a

        ranges = native.split_rows(n, threads)
        assert native.parallel(fn, n, threads) == [i * 1000 + a for i, (a, _) in enumerate(ranges)]  # in order
        assert sorted(c[:3] for c in calls) == [(i, a, b) for i, (a, b) in enumerate(ranges)]
        on = {part: ident for part, _, _, ident in calls}
        assert on[0] == threading.get_ident()  # the caller works instead of waiting
        assert all(on[p] != threading.get_ident() for p in on if p > 0)


def test_parallel_raises_what_a_range_raises():
    from dsarl.kernels import native

    def fn(part, a, b):
        if part == 1:
            raise MemoryError("range 1")
        return a

    with pytest.raises(MemoryError, match="range 1"):
        native.parallel(fn, 10, 2)


def test_the_cache_is_keyed_on_the_cpu(tmp_path, monkeypatch):
    """Two CPU identities (one with AVX-512, one without, on a shared home directory) get two builds;
    the same identity reuses its build without compiling again."""
    from dsarl.kernels import native

    cc = native._compiler()
    if cc is None:
        pytest.skip("needs a C compiler (cc/gcc/clang)")
    monkeypatch.setenv("DSARL_NATIVE_CACHE", str(tmp_path))
    src = native.source("topk/cpu.c")
    a, b = native.library_path(src, cc, "x86_64-avx512"), native.library_path(src, cc, "x86_64-avx2")
    assert a != b and a.parent != b.parent and a.name == b.name  # one folder per CPU, same source tag
    assert native.library_path(src, cc, "x86_64-avx512") == a
    built = native._build(src, cpu="x86_64-avx512")
    assert built == a and a.is_file() and not b.exists()
    stamp = a.stat().st_mtime_ns
    assert native._build(src, cpu="x86_64-avx512") == a and a.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert native._build(src, cpu="x86_64-avx2") == b and b.is_file()  # the other CPU builds its own
    here = native.cpu_identity(cc)  # this machine: its arch and a hash of what -march=native enables
    assert here.startswith(os.uname().machine + "-") and here == native.cpu_identity(cc)


def test_sources_are_found_through_the_package():
    """native.source resolves the C files next to the installed kernels package (a wheel's package data),
    and a missing source is a build error that names the file, not a crash at import."""
    from pathlib import Path

    from dsarl import kernels
    from dsarl.kernels import native

    for rel in ("topk/cpu.c", "sparse_mla/cpu.c"):
        path = native.source(rel)
        assert path.is_file() and path == Path(kernels.__file__).parent / rel
    if native._compiler() is not None:
        with pytest.raises(RuntimeError, match="nope.c is missing"):
            native._build(native.source("topk/nope.c"), cpu="any")


def test_cpu_identity_follows_the_features_the_compiler_enables(tmp_path):
    """Stand-in compilers that report different -march=native macros (an AVX-512 CPU and one without)
    give different identities; the same report gives the same one."""
    from dsarl.kernels import native

    def fake_cc(name: str, macros: str) -> str:
        path = tmp_path / name
        path.write_text(f"#!/bin/sh\nprintf '{macros}'\n")
        path.chmod(0o755)
        return str(path)

    avx512 = fake_cc("cc_a", "#define __AVX2__ 1\\n#define __AVX512F__ 1\\n")
    avx2 = fake_cc("cc_b", "#define __AVX2__ 1\\n")
    avx512_again = fake_cc("cc_c", "#define __AVX512F__ 1\\n#define __AVX2__ 1\\n")  # order does not matter
    assert native.cpu_identity(avx512) != native.cpu_identity(avx2)
    assert native.cpu_identity(avx512) == native.cpu_identity(avx512_again)
