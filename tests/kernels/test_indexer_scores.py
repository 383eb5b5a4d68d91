import pytest
import torch

from dsarl.kernels import indexer_scores
from dsarl.kernels.fp8 import fp8_quantize
from dsarl.kernels.indexer_scores.reference import indexer_scores_reference
from dsarl.kernels.indexer_scores.triton import indexer_scores_fwd, indexer_scores_triton

from kernel_utils import DEVICE, needs_cuda, rel_err
from fresh_seeds import fresh_seed


def _inputs(gen, B, T, S, H, D, dtype=torch.float32):
    q = torch.randn(B, T, H, D, generator=gen).to(DEVICE, dtype)
    w = torch.randn(B, T, H, generator=gen).to(DEVICE)
    k = torch.randn(B, S, D, generator=gen).to(DEVICE, dtype)
    return q, w, k


@pytest.mark.parametrize("B,T,S,H,D", [(1, 1, 1, 1, 8), (2, 19, 37, 3, 20), (1, 33, 70, 5, 16)])
def test_matches_reference_causal(gen, B, T, S, H, D):
    q, w, k = _inputs(gen, B, T, S, H, D)
    k_scale = torch.rand(B, S, generator=gen).to(DEVICE) + 0.5
    for ks in (None, k_scale):
        got = indexer_scores_triton(q, w, k, k_scale=ks)
        assert rel_err(got, indexer_scores_reference(q, w, k, k_scale=ks)) <= 1e-5


def test_explicit_positions_and_padding(gen):
    """Arbitrary positions: padded keys (-1), queries that see nothing, tiles that skip the head loop."""
    B, T, S, H, D = 2, 21, 45, 3, 12
    q, w, k = _inputs(gen, B, T, S, H, D)
    q_pos = torch.randint(-1, 60, (B, T), generator=gen).to(DEVICE)
    k_pos = torch.randint(-1, 60, (B, S), generator=gen).to(DEVICE)
    q_pos[0, :5] = -1  # queries with no visible key: whole rows of -inf
    got = indexer_scores_fwd(q, w, k, q_pos, k_pos, None, block_t=16, block_s=16)
    assert rel_err(got, indexer_scores_reference(q, w, k, q_pos, k_pos)) <= 1e-5


def test_public_op_dispatch(gen, monkeypatch):
    """STYLE rule 21: the public op runs every backend on the same inputs."""
    q, w, k = _inputs(gen, 1, 9, 17, 3, 8)
    outs = {}
    for backend in ("reference", "triton") + (("cpu",) if DEVICE == "cpu" else ()):
        monkeypatch.setenv("DSARL_KERNELS", backend)
        outs[backend] = indexer_scores(q, w, k)
    assert rel_err(outs["triton"], outs["reference"]) <= 1e-5
    assert DEVICE != "cpu" or rel_err(outs["cpu"], outs["reference"]) <= 1e-5


def test_reference_gradcheck(gen):
    q = torch.randn(1, 3, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    f = lambda q, w, k: indexer_scores_reference(q, w, k).nan_to_num(neginf=0.0)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, w, k))


@needs_cuda
def test_bf16_close_to_fp32(gen):
    q, w, k = _inputs(gen, 2, 300, 300, 64, 128)
    got = indexer_scores_triton(q.bfloat16(), w, k.bfloat16())
    ref = indexer_scores_reference(q, w, k)
    fin = torch.isfinite(ref)
    assert ((got - ref)[fin].norm() / ref[fin].norm()).item() <= 1e-2


def _topk_overlap(a: torch.Tensor, b: torch.Tensor, K: int) -> float:
    a, b = a.topk(K).indices.tolist(), b.topk(K).indices.tolist()
    return sum(len(set(x) & set(y)) for x, y in zip(a, b)) / (len(a) * K)


@needs_cuda
def test_fp8_topk_overlap(gen):
    """The fp8 kernel selects what its quantized inputs select, and loses nothing beyond the quantization.

    DESIGN.md section 10 asks the fp8 indexer's top-k to overlap the fp32 one by >= 0.99. On these
    i.i.d. Gaussian scores (dense near-ties at the 64th place) per-row e4m3 quantization alone reaches
    0.964 (the fp32 reference on the dequantized inputs, measured on the H100 and on the CPU alike;
    bf16 inputs: 0.997), so 0.99 is asked of the kernel against the quantized reference, and against
    fp32 the kernel may not lose more than the quantization does."""
    B, T, S, H, D, K = 1, 256, 1024, 64, 128, 64
    q, w, k = _inputs(gen, B, T, S, H, D)
    q8, q_s = fp8_quantize(q)  # [B, T, H, D], [B, T, H]
    k8, k_s = fp8_quantize(k)  # [B, S, D], [B, S]
    got = indexer_scores_triton(q8, w * q_s, k8, k_scale=k_s)[0, -128:]  # rows see >= K keys
    dequantized = indexer_scores_reference(q8.float() * q_s[..., None], w, k8.float() * k_s[..., None])[0, -128:]
    exact = indexer_scores_reference(q, w, k)[0, -128:]
    assert _topk_overlap(got, dequantized, K) >= 0.99
    assert _topk_overlap(got, exact, K) >= _topk_overlap(dequantized, exact, K) - 0.005


@pytest.mark.parametrize("tiles", [None, (4, 8), (5, 3)])  # None: the default tiles, larger than these shapes
@pytest.mark.parametrize("shape", [(2, 7, 3, 16, 11), (1, 33, 5, 8, 40)])
def test_matmul_cpu_path_matches_reference(shape, tiles, monkeypatch):
    from dsarl.kernels.indexer_scores import matmul
    from dsarl.kernels.indexer_scores.matmul import indexer_scores_matmul

    if tiles is not None:  # several query and key tiles, ragged at both ends
        monkeypatch.setattr(matmul, "QUERY_TILE", tiles[0])
        monkeypatch.setattr(matmul, "KEY_TILE", tiles[1])

    B, T, H, D, S = shape
    g = torch.Generator().manual_seed(fresh_seed())
    q, w, k = torch.randn(B, T, H, D, generator=g), torch.randn(B, T, H, generator=g), torch.randn(B, S, D, generator=g)
    q_pos = torch.randint(-1, S, (B, T), generator=g)
    k_pos = torch.randint(-1, S, (B, S), generator=g)
    k_scale = torch.rand(B, S, generator=g) + 0.5
    ref = indexer_scores_reference(q, w, k, q_pos, k_pos, k_scale)
    out = indexer_scores_matmul(q, w, k, q_pos, k_pos, k_scale)
    assert torch.equal(torch.isinf(ref), torch.isinf(out))
    finite = torch.isfinite(ref)
    assert ((out[finite] - ref[finite]).abs() <= 1e-5 * ref[finite].abs().clamp(min=1)).all()


def test_selected_scores_equal_the_full_scores_gathered(gen):
    """indexer_scores_selected (the sparse stage's KL input) against gathering the reference's full
    scores on the same indices: values and the gradients of q, w, k; k_scale included."""
    from dsarl.kernels import indexer_scores_selected

    B, T, S, H, D, K = 2, 9, 13, 3, 8, 5
    q = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, T, H, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, S, D, generator=gen, dtype=torch.float64, requires_grad=True)
    k_scale = torch.rand(B, S, generator=gen, dtype=torch.float64)
    t = torch.arange(S - T, S)[None, :, None]
    idx = (torch.rand(B, T, K, generator=gen) * (t + 1)).long().to(torch.int32)  # visible keys only
    weights = torch.randn(B, T, K, generator=gen, dtype=torch.float64)
    got = indexer_scores_selected(q, w, k, idx, k_scale)
    ref = indexer_scores_reference(q, w, k, k_scale=k_scale).gather(-1, idx.long())
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad((got * weights).sum(), (q, w, k))
    g_ref = torch.autograd.grad((ref * weights).sum(), (q, w, k))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
