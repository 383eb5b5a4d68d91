import math

import pytest
import torch

from dsarl.learner.distill_loss import distill_loss, rejection_filter, reverse_kl_per_token, sampled_reverse_kl


def _toy():
    # position 0: p_s = [1/2, 1/4, 1/4], p_t = [1/4, 1/2, 1/4]
    #   KL = 1/2 ln 2 + 1/4 ln(1/2) + 0 = 1/4 ln 2
    # position 1: p_s = [1, 0+, ...] approximated by p_s = [0.8, 0.1, 0.1], p_t = [0.2, 0.4, 0.4]
    #   KL = 0.8 ln 4 + 2 * 0.1 ln(0.25)
    ps = torch.tensor([[[0.5, 0.25, 0.25], [0.8, 0.1, 0.1]]])
    pt = torch.tensor([[[0.25, 0.5, 0.25], [0.2, 0.4, 0.4]]])
    expected = [0.25 * math.log(2), 0.8 * math.log(4) + 0.2 * math.log(0.25)]
    # logits are log-probabilities plus an arbitrary per-position shift (softmax ignores it)
    return ps.log() + 3.0, pt.log() - 1.5, expected


def test_reverse_kl_hand_values():
    s, t, expected = _toy()
    kl = reverse_kl_per_token(s, t, torch.ones(1, 2))
    assert kl.dtype == torch.float32
    assert kl[0, 0].item() == pytest.approx(expected[0], abs=1e-6)
    assert kl[0, 1].item() == pytest.approx(expected[1], abs=1e-6)


def test_reverse_kl_is_zero_when_student_equals_teacher():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 13, generator=g)
    assert torch.equal(reverse_kl_per_token(logits, logits.clone(), torch.ones(2, 4)), torch.zeros(2, 4))


def test_reverse_kl_direction_is_student_first():
    s, t, _ = _toy()
    fwd = reverse_kl_per_token(t, s, torch.ones(1, 2))
    # KL(t || s) at position 1 = 0.2 ln(1/4) + 2 * 0.4 ln 4, different from KL(s || t)
    assert fwd[0, 1].item() == pytest.approx(0.2 * math.log(0.25) + 0.8 * math.log(4), abs=1e-6)


def test_distill_loss_mean_over_unmasked_and_gradient_into_student_only():
    s, t, expected = _toy()
    s = torch.cat([s, s.flip(1)]).requires_grad_(True)  # [2, 2, 3]
    t = torch.cat([t, t.flip(1)]).requires_grad_(True)
    mask = torch.tensor([[1, 1], [0, 1]], dtype=torch.bool)  # row 1: only position 1 (= toy position 0)
    loss = distill_loss(s, t, mask)
    assert loss.item() == pytest.approx((expected[0] + expected[1] + expected[0]) / 3, abs=1e-6)
    loss.backward()
    assert t.grad is None
    assert torch.equal(s.grad[1, 0], torch.zeros(3))
    # d KL / d logits_s = p_s * (log p_s - log p_t - KL), divided by the 3 tokens
    ps, pt = torch.softmax(s.detach(), -1), torch.softmax(t.detach(), -1)
    kl = (ps * (ps.log() - pt.log())).sum(-1, keepdim=True)
    analytic = ps * (ps.log() - pt.log() - kl) / 3 * mask.unsqueeze(-1)
    torch.testing.assert_close(s.grad, analytic, rtol=1e-5, atol=1e-6)


def test_distill_loss_normalizer():
    s, t, expected = _toy()
    assert distill_loss(s, t, torch.ones(1, 2), normalizer=4.0).item() == pytest.approx(sum(expected) / 4, abs=1e-6)


def test_sampled_reverse_kl_is_unbiased_in_value_when_sampling_the_student():
    s, t, expected = _toy()
    ps, lt = torch.softmax(s[0, 1], -1), torch.log_softmax(t[0, 1], -1)
    n = 100_000
    x = torch.multinomial(ps, n, replacement=True, generator=torch.Generator().manual_seed(1))
    est = sampled_reverse_kl(ps.log()[x], lt[x])
    se = est.std().item() / math.sqrt(n)
    assert abs(est.mean().item() - expected[1]) < 5 * se
    out = sampled_reverse_kl(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-3.0, -1.5]]))
    assert torch.equal(out, torch.tensor([[2.0, -0.5]]))


def test_rejection_filter_keeps_exactly_strictly_above():
    rewards = torch.tensor([0.0, 0.5, 0.50001, 1.0, float("nan"), -1.0, float("inf")])
    assert rejection_filter(rewards, 0.5).tolist() == [False, False, True, True, False, False, True]
    grid = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert rejection_filter(grid, 0.0).tolist() == [[False, True], [True, True]]


def test_shape_errors():
    with pytest.raises(ValueError, match="teacher_logits"):
        reverse_kl_per_token(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2))
    with pytest.raises(ValueError, match="mask"):
        reverse_kl_per_token(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(2, 1))
