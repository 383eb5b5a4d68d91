"""The C kernels' build and fallback (kernels/native.py), in fresh interpreters: the library is loaded
once per process, so switching it off or breaking the compiler needs a new one."""
import os
import subprocess
import sys

PROBE = r"""
import torch
from dsarl.kernels import native, sparse_mla_attention
from dsarl.kernels.sparse_mla import cpu
from dsarl.kernels.sparse_mla.reference import sparse_mla_attention_reference
g = torch.Generator().manual_seed(0)
q, kv = torch.randn(1, 9, 3, 24, generator=g), torch.randn(1, 9, 24, generator=g)
idx = torch.randint(-1, 9, (1, 9, 5), generator=g, dtype=torch.int32)
got, ref = sparse_mla_attention(q, kv, idx, 0.3, 16)[0], sparse_mla_attention_reference(q, kv, idx, 0.3, 16)[0]
print("AVAILABLE", cpu.available())
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
    assert float(got["ERR"]) <= 1e-5  # the public op still answers, through chunked.py
    assert not (tmp_path / "cache").exists()  # nothing was built


def test_a_failing_compiler_is_reported_and_the_op_still_works(tmp_path):
    got = _probe(tmp_path, CC="false")  # /bin/false: a compiler that always fails
    assert got["AVAILABLE"] == "False" and "false failed" in got["REASON"]
    assert got["STDERR"].count("sparse_mla/cpu.c unavailable, using the torch path") == 1  # once, not per call
    assert float(got["ERR"]) <= 1e-5


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
