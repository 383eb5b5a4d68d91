import pytest
import torch

from dsarl.kernels import indexer_kl_loss
from dsarl.kernels.indexer_kl.reference import indexer_kl_loss_reference
from dsarl.kernels.indexer_kl.triton import indexer_kl_loss_triton
from kernel_utils import DEVICE, rel_err


def _inputs(gen, B, T, K):
    """-inf scores (invisible keys), a row with no valid key, a zero-mass target row, target zeros."""
    scores = torch.randn(B, T, K, generator=gen) * 3
    scores[0, 0, 3:] = float("-inf")
    scores[-1, -1] = float("-inf")
    target = torch.rand(B, T, K, generator=gen)
    target[0, 1] = 0.0
    target[..., ::3] = 0.0
    return target.to(DEVICE), scores.to(DEVICE)


@pytest.mark.parametrize("B,T,K", [(1, 2, 1), (2, 5, 37), (1, 3, 2100)])  # K > one 1024 block
@pytest.mark.parametrize("explicit_valid", [False, True])
def test_matches_reference(gen, B, T, K, explicit_valid):
    target, scores = _inputs(gen, B, T, K)
    valid = None
    if explicit_valid:
        valid = torch.isfinite(scores) & (torch.rand(B, T, K, generator=gen) > 0.2).to(DEVICE)
    s1, s2 = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    a = indexer_kl_loss_triton(target, s1, valid)
    b = indexer_kl_loss_reference(target, s2, valid)
    assert rel_err(a, b) <= 1e-5
    (g1,), (g2,) = torch.autograd.grad(2.5 * a, s1), torch.autograd.grad(2.5 * b, s2)
    assert rel_err(g1, g2) <= 1e-4


def test_public_op_backends(gen, monkeypatch):
    target, scores = _inputs(gen, 2, 4, 9)
    vals = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("DSARL_KERNELS", backend)
        vals[backend] = indexer_kl_loss(target, scores)
    assert rel_err(vals["triton"], vals["reference"]) <= 1e-5


def test_reference_gradcheck(gen):
    target, scores = _inputs(gen, 1, 3, 4)
    s = scores.cpu().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: indexer_kl_loss_reference(target.cpu().double(), s), (s,))
