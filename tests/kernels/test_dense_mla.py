"""dense_mla's CPU backend (the sparse MLA C kernel over every visible key) against the reference."""
import pytest
import torch

from dsarl.kernels import native
from dsarl.kernels.dense_mla.cpu import dense_mla_attention_cpu
from dsarl.kernels.dense_mla.reference import dense_mla_attention_reference
from dsarl.kernels.sparse_mla import cpu as sparse_cpu
from kernel_utils import rel_err

pytestmark = pytest.mark.skipif(not native.available(sparse_cpu.SOURCE),
                                reason="the C kernels need a C compiler (cc/gcc/clang)")


def _positions(gen, B, T, S):
    """Decode-like positions: each row's keys 0..n-1 written (n random), the rest of the cache unwritten
    (-1); its T queries the last T written positions. Row 0 has no key at all (out 0, lse -inf)."""
    k_pos = torch.full((B, S), -1, dtype=torch.long)
    q_pos = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        n = 0 if b == 0 else int(torch.randint(T, S + 1, (1,), generator=gen))
        k_pos[b, :n] = torch.arange(n)
        q_pos[b] = torch.arange(n - T, n) if n else -1
    return q_pos, k_pos


def _run(fn, q, kv, q_pos, k_pos, d_v, do, dlse):
    out, lse, probs = fn(q, kv, 0.13, d_v, q_pos, k_pos, True)
    dq, dkv = torch.autograd.grad((out * do).sum() + (lse.nan_to_num(neginf=0.0) * dlse).sum(), (q, kv))
    return out, lse, probs, dq, dkv


@pytest.mark.parametrize("B,T,S,H,Dqk,d_v", [(3, 1, 37, 4, 80, 64), (2, 5, 19, 3, 33, 16), (4, 16, 64, 2, 40, 24)])
def test_matches_reference_with_padding_and_an_empty_row(gen, B, T, S, H, Dqk, d_v):
    q = torch.randn(B, T, H, Dqk, generator=gen, requires_grad=True)
    kv = torch.randn(B, S, Dqk, generator=gen, requires_grad=True)
    q_pos, k_pos = _positions(gen, B, T, S)
    do, dlse = torch.randn(B, T, H, d_v, generator=gen), torch.randn(B, T, H, generator=gen)
    got = _run(dense_mla_attention_cpu, q, kv, q_pos, k_pos, d_v, do, dlse)
    ref = _run(dense_mla_attention_reference, q, kv, q_pos, k_pos, d_v, do, dlse)
    assert torch.isinf(ref[1][0]).all() and (ref[0][0] == 0).all()  # the empty row is really empty
    for name, a, b, tol in zip(("out", "lse", "probs", "dq", "dkv"), got, ref, (1e-5, 1e-5, 1e-5, 1e-4, 1e-4)):
        assert rel_err(a, b) <= tol, name


def test_default_positions_are_causal_over_the_last_queries(gen):
    q, kv = torch.randn(2, 3, 2, 16, generator=gen), torch.randn(2, 7, 16, generator=gen)
    for a, b in zip(dense_mla_attention_cpu(q, kv, 0.2, 8), dense_mla_attention_reference(q, kv, 0.2, 8)):
        assert rel_err(a, b) <= 1e-5


def test_reused_positions_give_fresh_masks_after_an_in_place_change(gen):
    """The CPU backend reuses the last call's visible slots for the same position tensors (a forward's
    layers); positions changed in place, or other tensors, get their own."""
    B, T, S, H, D, d_v = 2, 2, 12, 2, 24, 16
    q, kv = torch.randn(B, T, H, D, generator=gen), torch.randn(B, S, D, generator=gen)
    q_pos, k_pos = torch.tensor([[4, 5], [8, 9]]), torch.arange(S).expand(B, S).clone()
    for change in (None, lambda: q_pos.sub_(3), lambda: k_pos[:, 2:].fill_(-1)):
        if change is not None:
            change()
        for _ in range(2):  # the second call reuses the first's slots
            got = dense_mla_attention_cpu(q, kv, 0.2, d_v, q_pos, k_pos, True)
            want = dense_mla_attention_reference(q, kv, 0.2, d_v, q_pos, k_pos, True)
            for a, b in zip(got, want):
                assert rel_err(a, b) < 1e-5
