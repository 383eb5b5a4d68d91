import pytest
import torch

from dsarl.kernels import sparse_mla_attention
from dsarl.kernels import native
from dsarl.kernels.sparse_mla import cpu as sparse_cpu
from dsarl.kernels.sparse_mla.reference import sparse_mla_attention_reference
from dsarl.kernels.sparse_mla.triton import sparse_mla_attention_triton, sparse_mla_fwd
from kernel_utils import DEVICE, needs_cuda, rel_err, rel_fro


def _inputs(gen, B, T, S, H, Dqk, K, dtype=torch.float32):
    """Awkward selections: k > visible prefix (-1 tails), a duplicate index, one query with no key."""
    q = torch.randn(B, T, H, Dqk, generator=gen)
    kv = torch.randn(B, S, Dqk, generator=gen)
    t = torch.arange(T)[None, :, None] + (S - T)  # causal prefix of each query
    idx = (torch.rand(B, T, K, generator=gen) * (t + 1)).long()  # [B, T, K] in [0, t]
    idx = idx.masked_fill(torch.arange(K)[None, None, :] > t, -1)  # fewer visible keys than K
    idx[:, :, -1] = -1
    if T > 2 and K > 2:
        idx[0, 2, 1] = idx[0, 2, 0]  # the same row twice in one selection
        idx[-1, 1] = -1  # an empty selection: out 0, lse -inf, zero gradients
    return (q.to(DEVICE, dtype).requires_grad_(), kv.to(DEVICE, dtype).requires_grad_(),
            idx.to(DEVICE, torch.int32))


def _run(fn, q, kv, idx, scale, d_v, do, dlse):
    out, lse, probs = fn(q, kv, idx, scale, d_v, True)
    dq, dkv = torch.autograd.grad((out * do).sum() + (lse.nan_to_num(neginf=0.0) * dlse).sum(), (q, kv))
    return out, lse, probs, dq, dkv


def assert_matches_reference(gen, impl, q, kv, idx, d_v):
    """Output, lse, probs and both gradients (random dout and dlse) of `impl` against the reference."""
    B, T, H, _ = q.shape
    do = torch.randn(B, T, H, d_v, generator=gen).to(DEVICE)
    dlse = torch.randn(B, T, H, generator=gen).to(DEVICE)
    fn = {"triton": sparse_mla_attention_triton, "cpu": sparse_cpu.sparse_mla_attention_cpu}[impl]
    got = _run(fn, q, kv, idx, 0.17, d_v, do, dlse)
    ref = _run(sparse_mla_attention_reference, q, kv, idx, 0.17, d_v, do, dlse)
    for name, a, b, tol in zip(("out", "lse", "probs", "dq", "dkv"), got, ref, (1e-5, 1e-5, 1e-5, 1e-4, 1e-4)):
        assert rel_err(a, b) <= tol, name


SHAPES = [  # B, T, S, H, Dqk, d_v, K
    (1, 1, 1, 1, 16, 16, 1),
    (2, 7, 23, 5, 40, 24, 9),
    (1, 19, 19, 3, 33, 16, 37),  # K > S, Dqk - d_v = 17 (tail padded to 32)
    (2, 9, 40, 6, 80, 64, 33),  # the C kernel's vector paths: 4 + 2 heads, 2 x 32 + 16 columns
    (1, 6, 70, 4, 160, 128, 64),  # the bench model's latent width
    (1, 5, 30, 3, 48, 48, 7),  # 32 + 16 columns: the 16-column tail with 2 + 1 heads, odd K, d_v = Dqk
    (2, 4, 25, 2, 56, 40, 11),  # d_v = 40: the value part's 8 scalar columns, then the key part's 16 more
]
needs_native = pytest.mark.skipif(not native.available(sparse_cpu.SOURCE),
                                  reason="the C kernels need a C compiler (cc/gcc/clang)")


@pytest.mark.parametrize("B,T,S,H,Dqk,d_v,K", SHAPES)
@pytest.mark.parametrize("impl", ["triton", pytest.param("cpu", marks=needs_native)])
def test_matches_reference(gen, impl, B, T, S, H, Dqk, d_v, K):
    if impl == "cpu" and DEVICE != "cpu":
        pytest.skip("the C kernel takes CPU tensors")
    q, kv, idx = _inputs(gen, B, T, S, H, Dqk, K)
    assert_matches_reference(gen, impl, q, kv, idx, d_v)


@needs_native
@pytest.mark.parametrize("B,S", [(3, 37), (1, 5), (2, 1)])
def test_cpu_kernel_reads_a_cache_view_in_place(gen, monkeypatch, B, S):
    """A decode step's kv is the cache's view [:, :S] of its [B, max_len, D] storage: the C forward reads
    it with its batch stride (no copy) and gives the reference's answers; the backward copies it."""
    if DEVICE != "cpu":
        pytest.skip("the C kernel takes CPU tensors")
    T, H, D, d_v, K = 1, 4, 48, 32, 8
    storage = torch.randn(B, S + 11, D, generator=gen)
    kv = storage[:, :S]
    assert not kv.is_contiguous() or B == 1
    q = torch.randn(B, T, H, D, generator=gen)
    idx = (torch.rand(B, T, K, generator=gen) * S).int()
    idx[..., -2:] = -1
    copies = []
    contiguous = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda t, *a, **k: copies.append(t.shape) or contiguous(t, *a, **k))
    got = sparse_cpu.sparse_mla_cpu_fwd(q, kv, idx, 0.2, d_v, True)
    assert tuple(kv.shape) not in copies or kv.is_contiguous()  # the view itself was never copied
    monkeypatch.undo()
    ref = sparse_mla_attention_reference(q, contiguous(kv), idx, 0.2, d_v, True)
    for name, a, b in zip(("out", "lse", "probs"), got, ref):
        assert rel_err(a, b) <= 1e-5, name


@pytest.mark.parametrize("H,Dqk,d_v,K", [(3, 48, 48, 7), (4, 80, 64, 33), (1, 16, 16, 5)])
@pytest.mark.parametrize("impl", ["triton", pytest.param("cpu", marks=needs_native)])
def test_every_slot_selected(gen, impl, H, Dqk, d_v, K):
    """Every slot holds a key, the last one included (_inputs always empties it): sums over an odd K reach
    their last row (the C kernel's column tails past the last multiple of 32, the Triton kernel's last key
    block)."""
    if impl == "cpu" and DEVICE != "cpu":
        pytest.skip("the C kernel takes CPU tensors")
    B, T, S = 2, 6, 3 * K
    q = torch.randn(B, T, H, Dqk, generator=gen).to(DEVICE).requires_grad_()
    kv = torch.randn(B, S, Dqk, generator=gen).to(DEVICE).requires_grad_()
    idx = torch.stack([torch.randperm(S, generator=gen)[:K] for _ in range(B * T)]).view(B, T, K)
    idx = idx.to(DEVICE, torch.int32)
    assert_matches_reference(gen, impl, q, kv, idx, d_v)


@needs_native
def test_cpu_kernel_threads(gen, monkeypatch):
    """Rows split over threads: each thread adds its kv gradient into its own buffer, so two runs on
    two threads are bitwise equal, and one thread agrees within fp32 rounding."""
    if DEVICE != "cpu":
        pytest.skip("the C kernel takes CPU tensors")
    q, kv, idx = _inputs(gen, 2, 31, 50, 6, 48, 20)
    do, dlse = torch.randn(2, 31, 6, 32, generator=gen), torch.randn(2, 31, 6, generator=gen)
    monkeypatch.setattr(native, "MIN_WORK_PER_THREAD", 1)  # split even this small call
    runs = {}
    for threads in (2, 2, 1):
        monkeypatch.setattr(torch, "get_num_threads", lambda n=threads: n)
        got = _run(sparse_cpu.sparse_mla_attention_cpu, q, kv, idx, 0.2, 32, do, dlse)
        if threads in runs:
            assert all(torch.equal(a, b) for a, b in zip(got, runs[threads]))
        runs[threads] = got
    for a, b in zip(runs[1], runs[2]):
        assert rel_err(a, b) <= 1e-5


def test_head_blocks_and_small_key_blocks(gen):
    """More heads than one head block (probs summed across blocks) and several key blocks."""
    q, kv, idx = _inputs(gen, 1, 5, 40, 37, 24, 35)
    got = sparse_mla_fwd(q.detach(), kv.detach(), idx, 0.3, 16, True, block_h=16, block_k=16)
    ref = sparse_mla_attention_reference(q.detach(), kv.detach(), idx, 0.3, 16, True)
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= 1e-5


def test_public_op_backends(gen, monkeypatch):
    """STYLE rule 21: default (the C kernel on CPU / Triton on CUDA), reference, cpu and triton agree."""
    q, kv, idx = _inputs(gen, 1, 6, 11, 3, 20, 5)
    outs = {}
    has_c = DEVICE == "cpu" and native.available(sparse_cpu.SOURCE)
    backends = ["", "reference", "triton"] + (["cpu"] if has_c else [])
    for backend in backends:
        monkeypatch.setenv("DSARL_KERNELS", backend)
        outs[backend] = sparse_mla_attention(q, kv, idx, 0.2, 12)[0]
    for backend in backends:
        assert rel_err(outs[backend], outs["reference"]) <= 1e-5, backend


def test_gradcheck_reference(gen):
    B, T, S, H, Dqk, d_v = 1, 3, 4, 2, 5, 3  # K = 3: idx below
    q = torch.randn(B, T, H, Dqk, generator=gen, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(B, S, Dqk, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[[0, -1, 1], [2, 0, -1], [3, 3, 1]]], dtype=torch.int32)
    for fn in (sparse_mla_attention_reference, sparse_mla_attention):  # fp64: the public op runs the reference
        f = lambda q, kv: fn(q, kv, idx, 0.4, d_v)  # noqa: E731
        assert torch.autograd.gradcheck(f, (q, kv))


@needs_cuda
def test_bf16_production_dims(gen):
    """Dqk 576 / d_v 512 with 128 heads in bf16 against the fp32 reference (rel. Frobenius <= 1e-2)."""
    B, T, S, H, Dqk, d_v, K = 1, 64, 512, 128, 576, 512, 256
    q, kv, idx = _inputs(gen, B, T, S, H, Dqk, K)
    do = torch.randn(B, T, H, d_v, generator=gen).to(DEVICE)
    dlse = torch.zeros(B, T, H, device=DEVICE)
    qb, kvb = (x.detach().bfloat16().requires_grad_() for x in (q, kv))
    got = _run(sparse_mla_attention_triton, qb, kvb, idx, 576 ** -0.5, d_v, do.bfloat16(), dlse)
    ref = _run(sparse_mla_attention_reference, q, kv, idx, 576 ** -0.5, d_v, do, dlse)
    fin = torch.isfinite(ref[1])
    assert rel_fro(got[1][fin], ref[1][fin]) <= 1e-2
    for i in (0, 2, 3, 4):
        assert rel_fro(got[i], ref[i]) <= 1e-2


def test_launch_falls_back_to_the_first_blocks_that_fit(monkeypatch):
    """A GPU without the shared memory for the requested blocks gets smaller ones (H100: 227 KB against
    the 385 KB the backward's first choice needs at H=128, d_v=512), remembered for the next call."""
    import triton

    from dsarl.kernels.sparse_mla import triton as sparse_triton

    launched = []

    class Kernel:  # a launch needing more than BH=32, BK=16 per program is refused, as Triton does
        class fn:
            __name__ = "fake_kernel"

        def __getitem__(self, grid):
            def run(*args, BH, BK, **meta):
                if BH * BK > 32 * 16:
                    raise triton.runtime.errors.OutOfResources(BH * BK, 32 * 16, "shared memory")
                launched.append((grid, BH, BK, meta.get("num_stages")))
            return run

    monkeypatch.setattr(sparse_triton, "_FITTING", {})
    sparse_triton._launch(Kernel(), 5, 2, 128, 64, 32, ("shape",), "arg")
    assert launched == [((5, 4, 2), 32, 16, 1)]  # 128 heads in blocks of 32: four programs per token
    sparse_triton._launch(Kernel(), 5, 2, 128, 64, 32, ("shape",), "arg")
    assert launched[-1] == ((5, 4, 2), 32, 16, 1) and len(launched) == 2  # found once, then reused
    class TooBig(Kernel):  # nothing fits: a clear error, not a silent wrong launch
        def __getitem__(self, grid):
            def run(*args, **meta):
                raise triton.runtime.errors.OutOfResources(1, 0, "shared memory")
            return run

    with pytest.raises(RuntimeError, match="no block size fits"):
        sparse_triton._launch(TooBig(), 5, 2, 8, 16, 16, ("other",), "arg")
