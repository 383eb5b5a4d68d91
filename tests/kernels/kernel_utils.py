"""Shared helpers of the kernel tests (device, tolerances)."""
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16/fp8 kernels need a GPU")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| over finite reference entries; infinities must match exactly."""
    assert a.shape == b.shape, f"{tuple(a.shape)} vs {tuple(b.shape)}"
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any(), "kernel left NaN (unwritten output?)"
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin) and torch.equal(a[~fin], b[~fin]), "infinities differ"
    if not fin.any():
        return 0.0
    return ((a - b)[fin].abs().max() / b[fin].abs().max().clamp(min=1e-30)).item()


def rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error (the bf16 tolerance of DESIGN.md section 10)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()
