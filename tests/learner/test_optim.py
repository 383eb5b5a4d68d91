"""build_optimizer: AdamW (fused where torch has it) against its update written out."""
import torch

from dsarl.learner.optim import OptimConfig, build_optimizer


def test_three_steps_equal_adamw_written_out_with_decay_on_matrices_only():
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(5, 3, generator=gen, requires_grad=True), torch.randn(4, generator=gen, requires_grad=True)]
    frozen = torch.randn(2, 2, generator=gen)  # requires_grad False: not the optimizer's
    cfg = OptimConfig(lr=3e-2, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
    opt = build_optimizer(params + [frozen], cfg)
    assert opt.defaults["fused"]  # CPU fp32 parameters take torch's fused kernel
    want = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(w) for w in want]
    v = [torch.zeros_like(w) for w in want]
    for step in range(1, 4):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            decay = cfg.weight_decay if want[i].dim() >= 2 else 0.0
            want[i] *= 1 - cfg.lr * decay  # decoupled decay
            m[i] = cfg.beta1 * m[i] + (1 - cfg.beta1) * g.double()
            v[i] = cfg.beta2 * v[i] + (1 - cfg.beta2) * g.double() ** 2
            m_hat, v_hat = m[i] / (1 - cfg.beta1 ** step), v[i] / (1 - cfg.beta2 ** step)
            want[i] -= cfg.lr * m_hat / (v_hat.sqrt() + cfg.eps)
    for p, w in zip(params, want):
        assert torch.allclose(p.double(), w, atol=1e-6, rtol=0), (p, w)
