"""RMSNorm and SwiGLU's product: the C kernels (rowwise/cpu.c) against fp64 references, forward and backward."""
import pytest
import torch

from dsarl import kernels
from dsarl.kernels import dispatch, native
from dsarl.kernels.rowwise import cpu as rowwise_cpu
from dsarl.kernels.rowwise.reference import rms_norm_reference, swiglu_reference
from kernel_utils import rel_err

pytestmark = pytest.mark.skipif(not native.available(rowwise_cpu.SOURCE),
                                reason="the C kernels need a C compiler (cc/gcc/clang)")

# Rows x widths: one row, odd widths (no full vector), a decode step's [64, 256], and a learner-sized
# call that splits into two parts (rows x width >= 2 x ELEMENTS_PER_THREAD)
SHAPES = [(1, 8), (3, 5, 33), (64, 1, 256), (7, 1000), (96, 896)]


def _grads(fn, inputs, dy):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*inputs)
    return (y, *torch.autograd.grad(y, inputs, dy))


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_fp64(gen, shape, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    x = torch.randn(*shape, generator=gen) * 4 + torch.randn(shape[-1], generator=gen)
    w = torch.randn(shape[-1], generator=gen) * 0.3 + 1
    dy = torch.randn(*shape, generator=gen)
    got = _grads(lambda a, b: rowwise_cpu.rms_norm_cpu(a, b, 1e-5), [x, w], dy)
    want = _grads(lambda a, b: rms_norm_reference(a, b, 1e-5), [x.double(), w.double()], dy.double())
    for name, g, r, tol in zip(("y", "dx", "dw"), got, want, (2e-7, 5e-7, 2e-6)):
        assert g.dtype == torch.float32 and rel_err(g, r) < tol, (name, rel_err(g, r))


@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_fp64(gen, shape, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    g = torch.randn(*shape, generator=gen) * 6  # past |g| = 87 / 6 the exp saturates: both tails seen below
    u = torch.randn(*shape, generator=gen)
    dh = torch.randn(*shape, generator=gen)
    got = _grads(rowwise_cpu.swiglu_cpu, [g, u], dh)
    want = _grads(swiglu_reference, [g.double(), u.double()], dh.double())
    for name, a, b in zip(("h", "dg", "du"), got, want):
        assert a.dtype == torch.float32 and rel_err(a, b) < 5e-7, (name, rel_err(a, b))


def test_swiglu_tails_and_non_finite_inputs_follow_torch():
    """silu saturates to g (g >> 0) and 0 (g << 0) without overflow; inf and NaN come out as torch's."""
    g = torch.tensor([-1e4, -100.0, -88.0, -87.5, -20.0, 0.0, 20.0, 88.0, 100.0, 1e4, float("inf"), float("-inf"),
                      float("nan")])
    u = torch.full_like(g, 1.5)
    got, want = rowwise_cpu.swiglu_cpu(g, u), swiglu_reference(g.double(), u.double()).float()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    fin = ~torch.isnan(want)
    assert torch.allclose(got[fin], want[fin], rtol=1e-6, atol=1e-30), (got, want)


def test_no_grad_and_in_place_forms_give_the_autograd_forms_bits(gen):
    """A rollout (no autograd, product written over gate) and the learner (autograd) compute the same
    values bit for bit: the sampler's and the learner's log-probs may differ only by the weights."""
    x = torch.randn(64, 1, 256, generator=gen)
    w = torch.randn(256, generator=gen, requires_grad=True)
    with torch.no_grad():
        y0 = rowwise_cpu.rms_norm_cpu(x, w, 1e-6)
    assert torch.equal(y0, rowwise_cpu.rms_norm_cpu(x, w, 1e-6))
    g, u = torch.randn(64, 896, generator=gen), torch.randn(64, 896, generator=gen)
    want = rowwise_cpu.swiglu_cpu(g.requires_grad_(), u)
    gate = g.detach().clone()
    with torch.no_grad():
        h = rowwise_cpu.swiglu_cpu(gate, u, inplace=True)
    assert h.data_ptr() == gate.data_ptr() and torch.equal(h, want)


def test_bf16_inputs_round_once(gen):
    """bf16 in, bf16 out: computed in fp32 and rounded once, so within one bf16 rounding of fp64."""
    x = (torch.randn(5, 300, generator=gen) * 3).bfloat16()
    w = torch.randn(300, generator=gen).bfloat16()
    y = rowwise_cpu.rms_norm_cpu(x, w, 1e-6)
    want = rms_norm_reference(x.double(), w.double(), 1e-6)
    assert y.dtype == torch.bfloat16 and ((y.double() - want).abs() <= want.abs() * 2**-8 + 1e-30).all()
    h = rowwise_cpu.swiglu_cpu(x, x.flip(0))
    want = swiglu_reference(x.double(), x.flip(0).double())
    assert h.dtype == torch.bfloat16 and ((h.double() - want).abs() <= want.abs() * 2**-8 + 1e-30).all()


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same bf16 bits, NaN anywhere matching NaN (torch's own NaN bits differ between its code paths)."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan].view(torch.int16), b[~nan].view(torch.int16))


@pytest.mark.parametrize("shape", [(3, 5, 33), (96, 896)])  # one part, and two parts on two threads
def test_bf16_swiglu_has_the_bits_of_fp32_rounded_once(gen, shape, monkeypatch):
    """bf16 gate and up run in bf16 in the kernel: forward and gradients equal the fp32 kernel's on the
    widened inputs, rounded to bf16 by torch (the path a bf16 pair took before). Tails and non-finite
    values included."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    g = (torch.randn(*shape, generator=gen) * 6).bfloat16()
    g.view(-1)[:6] = torch.tensor([float("inf"), float("-inf"), float("nan"), 100.0, -100.0, 1e-30])
    u, dh = torch.randn(*shape, generator=gen).bfloat16(), (torch.randn(*shape, generator=gen) * 1e3).bfloat16()
    h, dg, du = _grads(rowwise_cpu.swiglu_cpu, [g, u], dh)
    hf, dgf, duf = _grads(rowwise_cpu.swiglu_cpu, [g.float(), u.float()], dh.float())
    assert h.dtype == dg.dtype == du.dtype == torch.bfloat16
    for name, a, b in (("h", h, hf), ("dg", dg, dgf), ("du", du, duf)):
        assert _bits_equal(a, b.bfloat16()), name
    gate = g.clone()
    with torch.no_grad():
        out = rowwise_cpu.swiglu_cpu(gate, u, inplace=True)
    assert out.data_ptr() == gate.data_ptr() and _bits_equal(out, h)


def test_weight_gradient_sums_its_parts(gen, monkeypatch):
    """dw is summed per part: one and two parts agree within fp32 rounding, and two parts twice are equal."""
    x, w, dy = (torch.randn(200, 512, generator=gen), torch.randn(512, generator=gen),
                torch.randn(200, 512, generator=gen))
    runs = []
    for threads in (2, 2, 1):
        monkeypatch.setattr(torch, "get_num_threads", lambda n=threads: n)
        runs.append(_grads(lambda a, b: rowwise_cpu.rms_norm_cpu(a, b, 1e-6), [x, w], dy))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(runs[0], runs[2]))


def test_dispatch_takes_the_c_kernels_on_cpu_and_the_reference_for_fp64():
    x = torch.randn(2, 8)
    assert dispatch.choose_backend("rms_norm", x) == "cpu" and dispatch.choose_backend("swiglu", x) == "cpu"
    assert dispatch.choose_backend("rms_norm", x.double()) == "reference"
    with dispatch.record() as log:
        kernels.rms_norm(x, torch.ones(8), 1e-6)
        kernels.swiglu(x, x)
    assert log == [("rms_norm", "cpu"), ("swiglu", "cpu")]
